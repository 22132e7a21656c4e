"""A large corpus packed into token blocks once, and cached, so that a second run does not tokenise it again.

:func:`cpt.pack <sat_trainer.app.data.cpt.pack>` holds a whole set's tokens in Python lists, fine for the shipped
megabyte but not for a corpus of tens of millions of tokens. Here the documents are tokenised in batches into one
int32 stream (EOS after each document, as in ``pack``), stopped at a token cap, cut into blocks of ``block_size``
(the tail shorter than a block dropped) and saved as a ``datasets`` folder under
``$SAT_TRAINER_CACHE/corpus/``, keyed by the corpus's fingerprint, the tokenizer, the block size and the cap. A run
with the same four loads the folder (memory-mapped) instead.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...errors import SATError
from ..cache import cache_key

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from .python_source import Corpus

BATCH_FILES = 64  # documents per tokenizer call
MANIFEST = "blocks.json"


def corpus_blocks(
    name: str,
    corpus: Corpus,
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    *,
    max_tokens: int | None,
    cache_root: Path,
) -> datasets.Dataset:
    """Blocks of ``block_size`` tokens (``input_ids`` = ``labels``) of ``corpus`` (its files in order), at most
    ``max_tokens`` tokens of it (None: all), cached under ``cache_root``; prints what it built or reused.

    Raises:
        SATError: the corpus holds fewer than ``max_tokens`` tokens, or fewer than one block.
    """
    import datasets

    key = {
        "corpus": name,
        "split": split,
        "fingerprint": corpus.fingerprint(),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "block_size": block_size,
        "max_tokens": max_tokens,
    }
    folder = cache_root / "corpus" / f"{name}-{split}-{cache_key(key)[:16]}"
    if (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        print(f"sat_trainer: {_summary(manifest)}; reused from {folder}", flush=True)
        return datasets.load_from_disk(str(folder))
    stream, files = _tokenize(corpus.texts(), tokenizer, max_tokens)
    if max_tokens is not None and len(stream) < max_tokens:
        raise SATError(
            f"the corpus holds {len(stream):,} tokens of the {split} split, fewer than data.max_train_tokens="
            f"{max_tokens:,}; lower data.max_train_tokens (or null: all of it)"
        )
    blocks = len(stream) // block_size
    if not blocks:
        raise SATError(f"{len(stream)} tokens, fewer than one block of data.max_length={block_size}; lower data.max_length")
    grid = stream[: blocks * block_size].reshape(blocks, block_size)
    ready = datasets.Dataset.from_dict({"input_ids": grid, "labels": grid})
    manifest = {
        **key,
        "files": files,
        "tokens": int(len(stream)),
        "blocks": blocks,
        "packages": corpus.packages,
        "duplicate_files_dropped": corpus.duplicates,
        "files_skipped": corpus.skipped,
    }
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with _quiet():  # a bar for a save of seconds would only clutter the run's output
        ready.save_to_disk(str(partial))
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    partial.rename(folder)  # only a complete folder is ever reused
    print(f"sat_trainer: {_summary(manifest)}; cached in {folder}", flush=True)
    return datasets.load_from_disk(str(folder))


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the tokenizer's whole definition (vocabulary, merges, normalisation), EOS included."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    return cache_key({"tokenizer": text, "eos": tokenizer.eos_token_id})[:16]


def _tokenize(texts: Iterator[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int | None) -> tuple[np.ndarray, int]:
    """(the token stream of ``texts``, EOS after each, cut at ``max_tokens``; how many documents it read)."""
    eos = tokenizer.eos_token_id
    parts: list[np.ndarray] = []
    total = files = 0
    documents = iter(texts)
    while batch := list(islice(documents, BATCH_FILES)):
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.asarray([*ids, eos], dtype=np.int32))
            total += len(ids) + 1
            files += 1
            if max_tokens is not None and total >= max_tokens:
                return np.concatenate(parts)[:max_tokens], files
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), files


def _summary(manifest: dict) -> str:
    capped = f" (the first {manifest['max_tokens']:,}: data.max_train_tokens)" if manifest["max_tokens"] else ""
    return (
        f"builtin:{manifest['corpus']} {manifest['split']}: {manifest['tokens']:,} tokens{capped} from {manifest['files']:,} "
        f"files of {len(manifest['packages'])} packages ({manifest['duplicate_files_dropped']:,} duplicate files dropped), "
        f"{manifest['blocks']:,} blocks of {manifest['block_size']}"
    )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """datasets' progress bars off for the block, as they were after it."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()
