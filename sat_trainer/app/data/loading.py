"""Dataset specs -> `datasets.Dataset`: builtin corpora, local files and folders, hub datasets.

A spec is one string:

* ``builtin:shakespeare-base``, ``builtin:shakespeare-continual`` (column ``text``, one row per
  work), ``builtin:chatterbot`` (column ``messages``): the split is chosen by the caller;
* a local ``.txt`` file or a folder of them (one row per file), ``.jsonl``/``.json``,
  ``.parquet``, ``.csv``, or a folder written by ``Dataset.save_to_disk``: used whole;
* anything else is a hub dataset, loaded only when a run uses it: ``name``, ``name:split`` or
  ``name/config:split`` is not valid hub syntax, so write ``name@config:split`` for a config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import SATError
from . import corpus

if TYPE_CHECKING:  # imported where data loads, so that checking a spec stays fast
    import datasets

BUILTIN = {  # name -> split -> records
    "shakespeare-base": lambda split: [{"text": t} for t in corpus.shakespeare("base", split)],
    "shakespeare-continual": lambda split: [{"text": t} for t in corpus.shakespeare("continual", split)],
    "chatterbot": corpus.chatterbot,
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
