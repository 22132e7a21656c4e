"""Continual pre-training data: tokenise documents and pack them into fixed-length blocks."""

from __future__ import annotations

import datasets
from transformers import PreTrainedTokenizerBase

from ...errors import SATError


def pack(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int, text_field: str = "text"
) -> datasets.Dataset:
    """Blocks of ``block_size`` tokens (``input_ids`` = ``labels``) from the concatenated documents.

    Each document is followed by EOS so the model sees document boundaries; the tail shorter
    than a block is dropped (at most ``block_size - 1`` tokens of the whole set).
    """
    if text_field not in dataset.column_names:
        raise SATError(
            f"text column {text_field!r} (data.text_field) is not among the columns {dataset.column_names}; set data.text_field"
        )
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch[text_field], add_special_tokens=False, verbose=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    def group(batch):
        stream = [t for doc in batch["ids"] for t in doc]
        blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokenized = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    # One packing batch over the whole set: little text in the demos, and no tokens lost between batches.
    packed = tokenized.map(
        group, batched=True, batch_size=None, remove_columns=["ids"], desc=f"packing into {block_size}-token blocks"
    )
    if not len(packed):
        tokens = sum(len(ids) for ids in tokenized["ids"])  # small: less than one block
        raise SATError(
            f"{tokens} tokens, fewer than one block of data.max_length={block_size}; lower data.max_length or add text"
        )
    return packed
