"""Data for `sat-train`: shipped corpora, loaders, CPT packing, SFT formatting with loss masks.

torch, transformers and datasets are imported inside :func:`build_datasets`, not here, so that
validating a config (:mod:`.loading`, :mod:`.preflight`) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import SATError

PACKED = ("cpt", "pretrain")  # the tasks whose text is packed into blocks (pre-training from scratch is CPT's data)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


def build_datasets(task: str, data_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, dict, Any]:
    """(train set, {name: held-out set}, collator) for ``task`` ("cpt", "pretrain" or "sft").

    A set that packs into no CPT block, holds fewer tokens than ``data.max_train_tokens``, or whose SFT records
    all lose their response to truncation, raises :class:`SATError` naming its key and spec.
    """
    train = _prepare(
        task, data_cfg, tokenizer, "data.train", data_cfg.train, "train", data_cfg.max_train_samples, data_cfg.max_train_tokens
    )
    evals, collator = build_eval_sets(task, data_cfg, tokenizer)
    return train, evals, collator


def build_eval_sets(task: str, data_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[dict, Any]:
    """({name: held-out set}, collator): what :func:`build_datasets` gives, without the training set (for a
    script that evaluates a finished run on the held-out sets of its config)."""
    from transformers import DataCollatorForLanguageModeling

    from . import sft

    evals = {
        name: _prepare(task, data_cfg, tokenizer, f"data.eval.{name}", spec, "validation", data_cfg.max_eval_samples)
        for name, spec in data_cfg.eval.items()
    }
    if task in PACKED:
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        collator = sft.PadCollator(tokenizer.pad_token_id)
    return evals, collator


def _prepare(
    task: str,
    data_cfg: Any,
    tokenizer: PreTrainedTokenizerBase,
    key: str,
    spec: str,
    split: str,
    cap: int | None,
    max_tokens: int | None = None,
) -> datasets.Dataset:
    """One set, packed (CPT, pretrain) or tokenised with loss masks (SFT), at most ``cap`` blocks or records and
    (packed) the blocks of at most ``max_tokens`` tokens. A stream corpus is tokenised only up to ``max_tokens``."""
    from . import cpt, loading, sft

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        if task in PACKED and loading.is_stream(spec):
            ready = loading.stream_blocks(spec, split, tokenizer, data_cfg.max_length, max_tokens)
        elif task in PACKED:
            ready = _first_tokens(
                cpt.pack(loading.load(spec, split), tokenizer, data_cfg.max_length, data_cfg.text_field), max_tokens
            )
        else:
            raw = loading.load(spec, split)
            ready = sft.tokenize(raw.select(range(min(cap, len(raw)))) if cap else raw, tokenizer, data_cfg.max_length)
    except SATError as err:
        raise SATError(f"key {key!r} ({spec}): {err}") from None
    return ready.select(range(min(cap, len(ready)))) if cap else ready


def _first_tokens(blocks: datasets.Dataset, max_tokens: int | None) -> datasets.Dataset:
    """The blocks that hold the first ``max_tokens`` tokens (None: all); fewer tokens than that raise."""
    if max_tokens is None:
        return blocks
    size = len(blocks[0]["input_ids"])
    if len(blocks) * size < max_tokens:
        raise SATError(
            f"{len(blocks) * size:,} tokens in {len(blocks)} blocks, fewer than data.max_train_tokens={max_tokens:,}; "
            "lower data.max_train_tokens (or null: all of it)"
        )
    return blocks.select(range(max(1, max_tokens // size)))
