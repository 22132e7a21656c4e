"""The folder a `sat-train pretrain` run starts from: its BPE tokenizer and a randomly initialised model of its shape.

Pre-training from scratch is a CPT run whose model does not exist yet. :func:`ensure_init` makes it, once, as a
plain HF folder under ``$SAT_TRAINER_CACHE/scratch/`` (the rest of the run then treats it like any ``model:``
folder, so dense, SAT and the equal-time run of ``--compare-dense`` start from the same weights):

* the tokenizer is `sat-train pretrain-base`'s byte-level BPE (:func:`~.data.tokenizer.train_tokenizer`), trained
  on the first :data:`TOKENIZER_SAMPLE_CHARS` of ``data.train``'s training split, cached under
  ``$SAT_TRAINER_CACHE/tokenizers/`` by a hash of that sample and the vocabulary size (so shapes trained on
  the same corpus share it, and with it the cached token blocks);
* the model's config is built by :func:`model_config` (which `pretrain-base` builds its own with), its weights
  drawn after ``torch.manual_seed(training.seed)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import cache_dir, cache_key
from .shapes import SHAPES, check_shape_spec, model_config

if TYPE_CHECKING:
    from .run_config import RunConfig

TOKENIZER_SAMPLE_CHARS = 8_000_000  # what the BPE is trained on (~8 MB of text; seconds to a minute on 2 cores)


def ensure_init(cfg: RunConfig) -> Path:
    """The initial model folder of pretrain scenario ``cfg`` (tokenizer and random weights), made first if missing."""
    spec = check_shape_spec(cfg.model)
    sample = tokenizer_sample(cfg.data)
    tokenizer_dir = ensure_tokenizer(sample, spec["vocab_size"])
    seed = cfg.training.get("seed", 42)  # TrainingArguments' default seed
    key = cache_key({"tokenizer": tokenizer_dir.name, "spec": spec, "block_size": cfg.data.max_length, "seed": seed})
    out = cache_dir() / "scratch" / f"{spec['shape']}-{key[:12]}"
    if (out / "config.json").is_file():
        return out
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = model_config(spec["architecture"], spec["fields"], tokenizer, cfg.data.max_length)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    info = {
        **spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "tokenizer": str(tokenizer_dir),
    }
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with _quiet():  # a bar for one small file would only clutter the run's output
        model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "scratch_info.json").write_text(json.dumps(info, indent=2))
    partial.rename(out)  # only a complete folder is ever reused
    overridden = [f"{k}={v}" for k, v in spec["fields"].items() if v != SHAPES[spec["shape"]][1][k]]
    print(
        f"sat_trainer: initialised {spec['shape']}{' with ' + ', '.join(overridden) if overridden else ''} "
        f"({info['parameters']:,} parameters, vocabulary {len(tokenizer):,}, seed {seed}) in {out}",
        flush=True,
    )
    return out


def tokenizer_sample(data: Any) -> list[str]:
    """The documents of ``data.train``'s training split that the tokenizer is trained on: the first ones, in
    corpus order, up to :data:`TOKENIZER_SAMPLE_CHARS` (the last one cut there)."""
    from .data import loading

    if loading.is_stream(data.train):
        texts: Iterator[str] = loading.stream_texts(data.train, "train")
    else:
        texts = iter(loading.load(data.train, "train")[data.text_field])
    sample, size = [], 0
    for text in texts:
        sample.append(text[: TOKENIZER_SAMPLE_CHARS - size])
        size += len(sample[-1])
        if size >= TOKENIZER_SAMPLE_CHARS:
            break
    return sample


def ensure_tokenizer(sample: list[str], vocab_size: int) -> Path:
    """The folder of the byte-level BPE of ``vocab_size`` trained on ``sample``, trained first if missing."""
    from .data.tokenizer import train_tokenizer

    h = hashlib.sha256(str(vocab_size).encode())
    for text in sample:
        h.update(text.encode("utf-8", "replace") + b"\0")
    out = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{h.hexdigest()[:12]}"
    if (out / "tokenizer.json").is_file():
        return out
    start = time.perf_counter()
    tokenizer = train_tokenizer(sample, vocab_size=vocab_size)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    print(
        f"sat_trainer: trained a {len(tokenizer):,}-token byte-level BPE on {sum(map(len, sample)):,} characters "
        f"in {time.perf_counter() - start:.0f} s: {out}",
        flush=True,
    )
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' progress bars off for the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
