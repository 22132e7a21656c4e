"""`sat-train pretrain-base`: the small pretrained base model the offline demos start from.

SAT's premise (few MLP channels and heads matter for a given input) holds in *pretrained*
models, and no pretrained weights can be downloaded here, so the project builds its own once:
a byte-level BPE tokenizer (8k) and a Llama-architecture model with realistic proportions
(gated SiLU MLP at 2.75x hidden, GQA with 4 query heads per KV head, tied embeddings), trained
dense from scratch on the *base* domain (modern-spelling Shakespeare, no histories). It is saved
as a plain HF model + tokenizer under the cache folder and reused by every later run.

Its shape is :data:`~.shapes.SHAPES`' ``llama-6m`` and its config is built by :func:`~.scratch.model_config`, as
for `sat-train pretrain` (pre-training from scratch as a scenario, :mod:`.scratch`), which a shape can name.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from .data import corpus, cpt
from .data.tokenizer import train_tokenizer
from .shapes import SHAPES, model_config

BASE_VERSION = "v1"

# ~6.3M parameters; 600 steps of 8 x 256 tokens (about 1.2 epochs) take about 10 minutes on 2 CPU cores.
BASE_SHAPE = dict(SHAPES["llama-6m"][1])
BASE_TRAINING = dict(
    max_steps=600,
    per_device_train_batch_size=8,
    learning_rate=2e-3,
    lr_scheduler_type="cosine",
    warmup_steps=50,
    weight_decay=0.01,
)
BLOCK_SIZE = 256


def default_base_dir() -> Path:
    """``$SAT_TRAINER_CACHE/base-<version>`` (default cache: ``~/.cache/sat_trainer``)."""
    cache = Path(os.environ.get("SAT_TRAINER_CACHE", Path.home() / ".cache" / "sat_trainer"))
    return cache / f"base-{BASE_VERSION}"


def ensure_base(path: str | Path | None = None) -> Path:
    """The base model folder, built first if it is missing."""
    path = Path(path) if path else default_base_dir()
    if not (path / "config.json").is_file():
        print(f"sat_trainer: building the embedded base model into {path} (once; about 10 minutes on 2 CPU cores)")
        build_base(path)
    return path


def build_base(out_dir: str | Path, *, vocab_size: int = 8192, block_size: int = BLOCK_SIZE, **overrides: Any) -> dict[str, Any]:
    """Train tokenizer and model; ``overrides`` replace keys of the shape or training defaults
    (tests build a tiny one in seconds). Returns the build info also written to ``build_info.json``."""
    out = Path(out_dir)
    shape = {**BASE_SHAPE, **{k: v for k, v in overrides.items() if k in BASE_SHAPE}}
    training = {**BASE_TRAINING, **{k: v for k, v in overrides.items() if k not in BASE_SHAPE}}
    start = time.perf_counter()
    tokenizer = train_tokenizer(corpus.shakespeare("base", "train"), vocab_size=vocab_size)
    import datasets

    def blocks(domain: str, split: str):
        return cpt.pack(datasets.Dataset.from_dict({"text": corpus.shakespeare(domain, split)}), tokenizer, block_size)

    train, evals = blocks("base", "train"), {d: blocks(d, "validation") for d in corpus.DOMAINS}
    config = model_config("llama", shape, tokenizer, block_size)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=str(out / "_trainer"),
        optim="adamw_torch_fused",
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        **training,
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    result = trainer.train()
    metrics = {d: trainer.evaluate(eval_dataset=ds, metric_key_prefix=f"eval_{d}")[f"eval_{d}_loss"] for d, ds in evals.items()}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    shutil.rmtree(out / "_trainer", ignore_errors=True)  # the Trainer's scratch folder (nothing saved there)
    info = {
        "version": BASE_VERSION,
        "parameters": sum(p.numel() for p in model.parameters()),
        "shape": shape,
        "training": training,
        "block_size": block_size,
        "train_tokens_per_epoch": len(train) * block_size,
        "wall_time_s": round(time.perf_counter() - start, 1),
        "final_train_loss": round(result.training_loss, 4),
        "validation_loss": {d: round(v, 4) for d, v in metrics.items()},
        "validation_perplexity": {d: round(math.exp(v), 2) for d, v in metrics.items()},
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2))
    return info
