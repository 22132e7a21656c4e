"""Data for `sat-train`: shipped corpora, loaders, CPT packing, SFT formatting with loss masks."""

from __future__ import annotations

from typing import Any

import datasets
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from . import cpt, loading, sft


def build_datasets(task: str, data_cfg: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[datasets.Dataset, dict, Any]:
    """(train set, {name: held-out set}, collator) for ``task`` ("cpt" or "sft")."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def prepare(spec: str, split: str, cap: int | None) -> datasets.Dataset:
        raw = loading.load(spec, split)
        if task == "cpt":
            ready = cpt.pack(raw, tokenizer, data_cfg.max_length, data_cfg.text_field)
        else:
            ready = sft.tokenize(raw.select(range(min(cap, len(raw)))) if cap else raw, tokenizer, data_cfg.max_length)
        return ready.select(range(min(cap, len(ready)))) if cap else ready

    train = prepare(data_cfg.train, "train", data_cfg.max_train_samples)
    evals = {name: prepare(spec, "validation", data_cfg.max_eval_samples) for name, spec in data_cfg.eval.items()}
    if task == "cpt":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    else:
        collator = sft.PadCollator(tokenizer.pad_token_id)
    return train, evals, collator
