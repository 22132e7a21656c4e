"""SFT data: chat records or instruction/response pairs -> token ids with loss on responses only.

Records take either form of :mod:`sat_trainer.app.data.records`. The tokenizer's chat template
renders them; a tokenizer without one gets :data:`sat_trainer.app.data.tokenizer.CHAT_TEMPLATE`. Labels are -100 on everything except the
tokens of assistant turns (including the EOS the template closes them with): the model learns
to answer, not to repeat prompts.
"""

from __future__ import annotations

import logging

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from ...errors import SATError
from .records import to_messages
from .tokenizer import CHAT_TEMPLATE

logger = logging.getLogger("sat_trainer")

IGNORE = -100


def encode(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one conversation, labels masked outside assistant turns.

    Each assistant turn's span is the difference between the rendering up to it (with the
    generation prompt) and the rendering including it, so any chat template works.
    """
    ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> datasets.Dataset:
    """Encode every record; records left with no response token after truncation are dropped
    (logged with their count), and none left is an error naming ``max_length``."""
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    encoded = dataset.map(
        lambda r: encode(to_messages(r), tokenizer, max_length), remove_columns=dataset.column_names, desc="tokenizing chats"
    )
    kept = encoded.filter(lambda r: any(t != IGNORE for t in r["labels"]), desc="dropping records without response tokens")
    dropped = len(encoded) - len(kept)
    if dropped and not len(kept):
        raise SATError(
            f"all {dropped} records lose their whole response to truncation at data.max_length={max_length}; raise data.max_length"
        )
    if dropped:
        logger.warning(
            "sat_trainer: dropped %d of %d records with no response token left within max_length=%d",
            dropped,
            len(encoded),
            max_length,
        )
    return kept


class PadCollator:
    """Right-pads ``input_ids`` (pad id), ``labels`` (-100) and builds ``attention_mask``."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            fill = width - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [self.pad] * fill)
            out["labels"].append(list(f["labels"]) + [IGNORE] * fill)
            out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * fill)
        return {k: torch.tensor(v) for k, v in out.items()}


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered)
