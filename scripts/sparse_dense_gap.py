"""Diagnostic: does a model trained under SAT still work when run dense?

Trains the embedded base for ``--steps`` at a constant omission rate (no ladder, constant
learning rate), then measures the loss of one held-out batch twice: dense (``eval()``, how the
model is used afterwards) and sparse (training mode at the same rate, the network SAT trained).
A dense loss far above the sparse one means the omitted units, put back, disturb what the kept
ones learned; the ladder's dense rungs then have that gap to repair. A dense run of the same
steps gives the reference. This is how docs/journal/benchmarks.md found that omitting attention groups
hurts SFT on the demo base while omitting MLP channels does not.

Examples:
    python scripts/sparse_dense_gap.py --variants dense default targets=[mlp,attention] targets=[attention] selection=sampling,targets=[mlp,attention]
    python scripts/sparse_dense_gap.py --config configs/demo_cpt.yaml --steps 60
"""

from __future__ import annotations

import argparse

import torch
import transformers
from quality import task_of, variant_overrides  # scripts/quality.py: the same scenario and variant syntax

from sat_trainer import SATCallback
from sat_trainer.app import data as sat_data
from sat_trainer.app.builtin_models import resolve_model_path
from sat_trainer.app.run_config import load_run_config
from sat_trainer.patch.model import handle_of


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo_sft.yaml")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rate", type=float, default=0.5)
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument(
        "--variants",
        nargs="+",
        default=["dense", "default"],
        help="dense, default (the config's sat: block), or k=v[,k=v] changes to it, e.g. targets=[attention]",
    )
    args = p.parse_args(argv)
    task = task_of(args.config)
    cfg = load_run_config(task, args.config, ["training.output_dir=runs/sparse_dense_gap"])
    model_path = resolve_model_path(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    train_set, eval_sets, collator = sat_data.build_datasets(cfg.task, cfg.data, tokenizer)
    held_out = next(iter(eval_sets.values()))
    batch = collator([held_out[i] for i in range(min(args.eval_samples, len(held_out)))])
    print(f"| variant | held-out loss, dense | held-out loss, sparse at {args.rate} |\n|---|---|---|")
    for variant in args.variants:
        sat = None if variant == "dense" else sat_settings(task, args, variant)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path)
        training = transformers.TrainingArguments(
            output_dir="runs/sparse_dense_gap",
            max_steps=args.steps,
            per_device_train_batch_size=cfg.training["per_device_train_batch_size"],
            learning_rate=cfg.training["learning_rate"],
            lr_scheduler_type="constant",
            optim="adamw_torch_fused",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        callbacks = [] if sat is None else [SATCallback(sat)]
        trainer = transformers.Trainer(
            model=model, args=training, train_dataset=train_set, data_collator=collator, callbacks=callbacks
        )
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # keep stdout a clean table
        trainer.train()
        dense_loss = held_out_loss(model.eval(), batch)
        sparse = "" if sat is None else f"{sparse_loss(model, batch, args.rate):.3f}"
        print(f"| {variant} | {dense_loss:.3f} | {sparse} |", flush=True)


def sat_settings(task: str, args: argparse.Namespace, variant: str):
    """The config's ``sat:`` block at a constant ``--rate``, changed as the variant says."""
    _, overrides = variant_overrides(variant)
    return load_run_config(task, args.config, [f"sat.omission_rate={args.rate}", "sat.schedule=constant", *overrides]).sat


def held_out_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad():
        return model(**batch).loss.item()


def sparse_loss(model: torch.nn.Module, batch: dict, rate: float) -> float:
    """The loss of the network SAT trains: training mode (no dropout in these models) at ``rate``."""
    handle = handle_of(model)
    handle.set_rate(rate)
    handle.new_step()
    return held_out_loss(model.train(), batch)


if __name__ == "__main__":
    main()
