"""One `sat-train cpt|sft` run: load model and data, train with SAT (or dense), write the run folder.

The run folder (``training.output_dir``) holds the Trainer's checkpoints, ``final/`` (a plain HF
model and tokenizer, LoRA merged in; the adapter alone under ``adapter/``), ``report.json`` and
``report.png``.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from . import data as sat_data
from .builtin_models import resolve_model_path
from .callback import SATCallback
from .patch.model import remove_sat
from .report import ReportCallback, build_report, write_report
from .run_config import RunConfig

logger = logging.getLogger("sat_trainer")

def run(cfg: RunConfig, *, dense: bool = False, output_dir: Path | None = None) -> dict[str, Any]:
    """Train one scenario; with ``dense=True`` the same run without SAT. Returns the report."""
    out = Path(output_dir or cfg.output_dir)
    mode = "dense" if dense or cfg.sat is None else "sat"
    model_path = resolve_model_path(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    train_set, eval_sets, collator = sat_data.build_datasets(cfg.task, cfg.data, tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
    if cfg.lora is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **cfg.lora))

    args = transformers.TrainingArguments(**_training_defaults(cfg.training, has_eval=bool(eval_sets), out=out))
    record = ReportCallback()
    callbacks = [record] if mode == "dense" else [SATCallback(cfg.sat), record]
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_sets or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    logger.info("sat_trainer: %s run (%s) of %s -> %s", cfg.task, mode, model_path, out)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    if eval_sets and (not record.evals or record.evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
    _save_final(trainer.model, tokenizer, out, lora=cfg.lora is not None)
    report = build_report(record, mode=mode, config=_config_record(cfg, model_path), wall_time_s=wall)
    write_report(report, out)
    return report


def _training_defaults(training: dict[str, Any], *, has_eval: bool, out: Path) -> dict[str, Any]:
    """The scenario's TrainingArguments, with what a report needs filled in when left unset."""
    args = dict(training)
    args["output_dir"] = str(out)
    args.setdefault("report_to", [])
    args.setdefault("logging_steps", 10)
    args.setdefault("include_num_input_tokens_seen", True)
    args.setdefault("save_strategy", "no")
    if has_eval:
        args.setdefault("eval_strategy", "steps")
        args.setdefault("eval_steps", max(1, int(args.get("max_steps", 100)) // 10))
    return args


def _save_final(model: torch.nn.Module, tokenizer, out: Path, *, lora: bool) -> None:
    """A plain HF model that loads without sat_trainer (and, for LoRA, the adapter too)."""
    remove_sat(model)
    final = out / "final"
    if lora:
        model.save_pretrained(out / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)


def _config_record(cfg: RunConfig, model_path: str) -> dict[str, Any]:
    return {
        "task": cfg.task,
        "source": cfg.source,
        "model": cfg.model,
        "model_path": model_path,
        "data": vars(cfg.data),
        "training": cfg.training,
        "sat": cfg.sat.to_dict() if cfg.sat is not None else None,
        "lora": cfg.lora,
    }
