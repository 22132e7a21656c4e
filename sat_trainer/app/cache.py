"""Where sat-train keeps what it builds once and reuses: the builtin models, tokenizers, initial models and
tokenised corpora (``SAT_TRAINER_CACHE``, else ``~/.cache/sat_trainer``). A leaf module, so that model and data
code can both name the folder without importing each other."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SAT_TRAINER_CACHE", Path.home() / ".cache" / "sat_trainer"))


def cache_key(value: dict) -> str:
    """A SHA-256 of ``value`` as sorted JSON: what names a cached build, so that any change of its inputs rebuilds."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
