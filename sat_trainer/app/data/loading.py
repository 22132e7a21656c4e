"""Dataset specs -> `datasets.Dataset`: builtin corpora, local files and folders, hub datasets.

A spec is one string:

* ``builtin:shakespeare-base``, ``builtin:shakespeare-continual`` (column ``text``, one row per
  work), ``builtin:chatterbot`` (column ``messages``): the split is chosen by the caller;
  ``builtin:python-source`` (:mod:`.python_source`, tens of millions of tokens) is a *stream*: packed CPT blocks
  come from :func:`stream_blocks` (tokenised in batches, cached), not from :func:`load`;
* a local ``.txt`` file or a folder of them (one row per file), ``.jsonl``/``.json``,
  ``.parquet``, ``.csv``, or a folder written by ``Dataset.save_to_disk``: used whole;
* anything else is a hub dataset, loaded only when a run uses it: ``name``, ``name:split`` or
  ``name/config:split`` is not valid hub syntax, so write ``name@config:split`` for a config.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import SATError
from . import corpus, python_source

if TYPE_CHECKING:  # imported where data loads, so that checking a spec stays fast
    import datasets
    from transformers import PreTrainedTokenizerBase

STREAMS = {"python-source": python_source.build}  # name -> split -> its Corpus (too large for cpt.pack)
BUILTIN = {  # name -> split -> records
    "shakespeare-base": lambda split: [{"text": t} for t in corpus.shakespeare("base", split)],
    "shakespeare-continual": lambda split: [{"text": t} for t in corpus.shakespeare("continual", split)],
    "chatterbot": corpus.chatterbot,
    **{name: lambda split, build=build: [{"text": t} for t in build(split).texts()] for name, build in STREAMS.items()},
}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def check(spec: str) -> str:
    """Classify ``spec`` as "builtin", "local" or "hub" without loading it; raises for a missing
    local path or an unknown builtin, so a bad config fails before any training starts."""
    if spec.startswith("builtin:"):
        if spec[len("builtin:") :] not in BUILTIN:
            raise SATError(f"unknown builtin dataset {spec!r}; allowed: {', '.join('builtin:' + n for n in BUILTIN)}")
        return "builtin"
    if Path(spec).expanduser().exists():
        return "local"
    if spec.startswith((".", "/", "~")) or Path(spec).suffix in (*FILE_BUILDERS, ".txt"):
        raise SATError(f"data path not found: {spec}")
    return "hub"


def load(spec: str, split: str = "train") -> datasets.Dataset:
    """Load ``spec``; ``split`` selects builtin splits and the default hub split."""
    import datasets

    kind = check(spec)
    if kind == "builtin":
        return datasets.Dataset.from_list(BUILTIN[spec[len("builtin:") :]](split))
    if kind == "local":
        return _load_local(Path(spec).expanduser())
    return _load_hub(spec, split)


def is_stream(spec: str) -> bool:
    """Whether ``spec`` names a builtin stream corpus (:data:`STREAMS`)."""
    return spec.startswith("builtin:") and spec[len("builtin:") :] in STREAMS


def stream_texts(spec: str, split: str) -> Iterator[str]:
    """A stream corpus's documents of ``split``, in corpus order, read one at a time."""
    return STREAMS[spec[len("builtin:") :]](split).texts()


def stream_blocks(
    spec: str, split: str, tokenizer: PreTrainedTokenizerBase, block_size: int, max_tokens: int | None
) -> datasets.Dataset:
    """A stream corpus's ``split`` in packed blocks of ``block_size``, at most ``max_tokens`` tokens of it, cached under
    ``$SAT_TRAINER_CACHE/corpus`` (:func:`~.token_blocks.corpus_blocks`)."""
    from ..cache import cache_dir
    from .token_blocks import corpus_blocks

    name = spec[len("builtin:") :]
    return corpus_blocks(name, STREAMS[name](split), split, tokenizer, block_size, max_tokens=max_tokens, cache_root=cache_dir())


def _load_local(path: Path) -> datasets.Dataset:
    import datasets

    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        texts = sorted(path.glob("*.txt"))
        if not texts:
            raise SATError(f"data folder {path} holds neither a saved dataset nor .txt files")
        return datasets.Dataset.from_dict({"text": [p.read_text(encoding="utf-8") for p in texts]})
    if path.suffix == ".txt":
        return datasets.Dataset.from_dict({"text": [path.read_text(encoding="utf-8")]})
    if path.suffix not in FILE_BUILDERS:
        raise SATError(f"data file {path} has suffix {path.suffix!r}; allowed: .txt, {', '.join(FILE_BUILDERS)}")
    return datasets.load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")


def _load_hub(spec: str, split: str) -> datasets.Dataset:
    """The real hub load; what fails (no such dataset, config or split, no network) is one
    :class:`SATError` line instead of a traceback from inside ``datasets``."""
    import datasets
    from datasets.exceptions import DatasetsError

    name, _, chosen_split = spec.partition(":")
    name, _, config = name.partition("@")
    try:
        return datasets.load_dataset(name, config or None, split=chosen_split or split)
    except (OSError, ValueError, DatasetsError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise SATError(f"cannot be loaded from the hub: {reason}") from None
