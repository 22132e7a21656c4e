"""Data for `sat-train`: shipped corpora, loaders, CPT packing, SFT formatting with loss masks.

torch, transformers and datasets are imported inside :func:`build_datasets`, not here, so that
validating a config (:mod:`.loading`, :mod:`.preflight`) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...errors import SATError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase


def build_datasets(task: str, data_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, dict, Any]:
    """(train set, {name: held-out set}, collator) for ``task`` ("cpt" or "sft").

    A set that packs into no CPT block, or whose SFT records all lose their response to
    truncation, raises :class:`SATError` naming its key and spec.
    """
    train = _prepare(task, data_cfg, tokenizer, "data.train", data_cfg.train, "train", data_cfg.max_train_samples)
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
    if task == "cpt":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        collator = sft.PadCollator(tokenizer.pad_token_id)
    return evals, collator


def _prepare(
    task: str, data_cfg: Any, tokenizer: PreTrainedTokenizerBase, key: str, spec: str, split: str, cap: int | None
) -> datasets.Dataset:
    """One set, packed (CPT) or tokenised with loss masks (SFT), at most ``cap`` blocks or records."""
    from . import cpt, loading, sft

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        raw = loading.load(spec, split)
        if task == "cpt":
            ready = cpt.pack(raw, tokenizer, data_cfg.max_length, data_cfg.text_field)
        else:
            ready = sft.tokenize(raw.select(range(min(cap, len(raw)))) if cap else raw, tokenizer, data_cfg.max_length)
    except SATError as err:
        raise SATError(f"key {key!r} ({spec}): {err}") from None
    return ready.select(range(min(cap, len(ready)))) if cap else ready
