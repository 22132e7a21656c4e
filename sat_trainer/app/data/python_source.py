"""``builtin:python-source``: the Python source of installed, permissively licensed packages, as a pre-training corpus.

No English corpus of tens of millions of tokens can be fetched here (docs/journal/est_corpus_2026-12-07.md), but the
packages the project itself installs hold that much code, on disk: every ``*.py`` file of the packages in
:data:`PACKAGES` that is installed (about 180 MB of text, tens of millions of tokens). It is read at run time from
the installed packages, never copied into the repository; which package versions went in is in the build's
manifest (the corpus changes with them).

* **Dedup**: files with the same content (exact byte hash) count once, the first by package and path kept; files
  that are empty or not UTF-8 are left out.
* **Held-out split**: by file, never by line (code repeats lines across files): a file is held out when the hash of
  its path within site-packages (``torch/nn/modules/linear.py``) falls in the first :data:`HELD_OUT_PER_MILLE`
  of 1000 buckets, about 1% of the files; the same on every machine with the same packages.
* **Order**: files in the order of that path hash (a fixed shuffle across packages), so that a token cap
  (``data.max_train_tokens``) takes a sample of every package rather than the first package whole.

Licences of the packages read: torch, numpy, sympy, pandas, networkx, jinja2 (BSD-3-Clause), transformers,
datasets, huggingface_hub, accelerate, peft, tokenizers, safetensors (Apache-2.0), PyYAML (MIT), matplotlib
(the PSF-based matplotlib licence); vendored code inside them keeps its own (permissive) licence.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SATError

PACKAGES = (
    "torch",
    "transformers",
    "numpy",
    "sympy",
    "pandas",
    "networkx",
    "datasets",
    "huggingface_hub",
    "accelerate",
    "peft",
    "tokenizers",
    "safetensors",
    "yaml",
    "jinja2",
    "matplotlib",
)
HELD_OUT_PER_MILLE = 10  # 1% of the files
DISTRIBUTIONS = {"yaml": "PyYAML", "jinja2": "Jinja2"}  # import name -> distribution name, where they differ


@dataclass(frozen=True)
class SourceFile:
    """One kept file: its path within site-packages (``rel``), where it is, and its content's sha256."""

    rel: str
    path: Path
    digest: str


@dataclass
class Corpus:
    """The deduplicated files of one split, in corpus order, and what was read to get them."""

    files: list[SourceFile]
    packages: dict[str, str] = field(default_factory=dict)  # package -> installed version ("" when unknown)
    duplicates: int = 0  # files dropped as exact copies of an earlier one (both splits)
    skipped: int = 0  # empty or not UTF-8

    def fingerprint(self) -> str:
        """A hash of the split's file paths and contents: the cache key of anything built from it."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.rel}\0{f.digest}\n".encode())
        return h.hexdigest()

    def texts(self) -> Iterator[str]:
        """The files' contents, one string each, in corpus order."""
        for f in self.files:
            yield f.path.read_text(encoding="utf-8")


def package_dirs(names: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """{package: its installed folder} for each of ``names`` that is installed (found without importing it)."""
    found = {}
    for name in names:
        spec = importlib.util.find_spec(name)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if locations:
            found[name] = Path(locations[0])
    return found


def held_out(rel: str) -> bool:
    """Whether the file at ``rel`` (its path within site-packages) is in the held-out split."""
    return int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 1000 < HELD_OUT_PER_MILLE


def build(split: str, roots: dict[str, Path] | None = None) -> Corpus:
    """The ``split`` ("train" or "validation") of the corpus read from ``roots`` ({package: folder}; default: the
    installed :data:`PACKAGES`). Raises :class:`SATError` when none of them is installed."""
    if split not in ("train", "validation"):
        raise SATError(f"split {split!r} is not one of train, validation")
    roots = package_dirs() if roots is None else roots
    if not roots:
        raise SATError(f"builtin:python-source found none of its packages installed ({', '.join(PACKAGES)})")
    seen: set[str] = set()
    kept, duplicates, skipped = [], 0, 0
    for name, folder in sorted(roots.items()):
        for path in sorted(folder.rglob("*.py")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            if not data.strip() or not _utf8(data):
                skipped += 1
                continue
            rel = f"{name}/{path.relative_to(folder).as_posix()}"
            if held_out(rel) == (split == "validation"):
                kept.append(SourceFile(rel, path, digest))
    kept.sort(key=lambda f: hashlib.sha256(f.rel.encode()).hexdigest())
    return Corpus(kept, {name: _version(name) for name in sorted(roots)}, duplicates, skipped)


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(package, package))
    except importlib.metadata.PackageNotFoundError:
        return ""
