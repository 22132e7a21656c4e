"""One `sat-train cpt|sft|pretrain` run: load model and data, train with SAT, LTE (or dense), write the run folder.

A pretrain run's model is the initial folder :func:`~.scratch.ensure_init` makes of its shape (a BPE tokenizer
trained on its corpus, random weights); from there it is a CPT run.

The run folder (``training.output_dir``) holds the Trainer's checkpoints, ``final/`` (a plain HF
model and tokenizer, LoRA merged in; the adapter alone under ``adapter/``), ``report.json`` and
``report.png``. With ``data.curve_eval_samples`` the held-out curves are evaluated on a subset of
each held-out set and the report's held-out losses on the whole sets (:func:`curve_subsets`).
An LTE run (``lte:``) also writes ``lte.safetensors`` and ``lte_config.json`` into ``final/`` (``load_lte(model,
final)`` serves it sparse), and its report's held-out losses and ``lte`` entry are the hard stage's
(:mod:`.lte_run`).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from ..callback import SATCallback
from ..errors import SATTrainingError
from ..lte.callback import LTECallback
from ..patch.model import remove_sat
from . import data as sat_data
from . import step_timing
from .builtin_models import resolve_model_path
from .guard import NonFiniteGuard
from .lte_run import held_out_sparsity
from .model_source import check_model
from .report import FULL_EVAL_PREFIX, ReportCallback, build_report, write_report
from .run_config import RunConfig
from .step_timing import StepTimes
from .training_args import training_arguments

if TYPE_CHECKING:
    from ..lte.model import LTEHandle

logger = logging.getLogger("sat_trainer")


def run(cfg: RunConfig, *, dense: bool = False, output_dir: Path | None = None, resume_from: str | None = None) -> dict[str, Any]:
    """Train one scenario; with ``dense=True`` the same run without SAT or LTE. Returns the report.

    ``resume_from``: a checkpoint of this run to continue from (same ladder, draws and data
    order). Without LoRA the checkpoint holds the whole model and tokenizer, and they are
    loaded from it, so a base model folder changed since does not matter; with LoRA it holds
    the adapter only and the base is read again. Raises :class:`SATTrainingError` if the run
    diverges (``report.json`` is written, ``final/`` is not).
    """
    out = Path(output_dir or cfg.output_dir)
    mode = "dense" if dense else "sat" if cfg.sat is not None else "lte" if cfg.lte is not None else "dense"
    model_path = model_source(cfg)
    source = resume_from if resume_from and cfg.lora is None else model_path
    check_model(
        source,
        sat=cfg.sat if mode == "sat" else None,
        lte=cfg.lte if mode == "lte" else None,
        lora=cfg.lora,
        max_length=cfg.data.max_length,
    )
    tokenizer, model, (train_set, eval_sets, collator) = _load(cfg, source)
    curve_sets = curve_subsets(eval_sets, cfg.data.curve_eval_samples)
    args = training_arguments(cfg.training, has_eval=bool(eval_sets), output_dir=str(out), resumed=resume_from is not None)
    guard = NonFiniteGuard(cfg.max_skipped_steps)
    method = {"dense": [], "sat": [SATCallback(cfg.sat)], "lte": [LTECallback(cfg.lte)]}[mode]
    callbacks = [*method, guard, ReportCallback()]
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=curve_sets or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    logger.info(
        "sat_trainer: %s run (%s) of %s -> %s%s",
        cfg.task,
        mode,
        source,
        out,
        f", resumed from {resume_from}" if resume_from else "",
    )
    trainer.train(resume_from_checkpoint=resume_from)
    # the Trainer rebuilds stateful callbacks on resume when restore_callback_states_from_checkpoint is set
    record = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ReportCallback))
    calibration = next((cb.calibration for cb in trainer.callback_handler.callbacks if isinstance(cb, SATCallback)), None)
    lte_handle = next((cb.handle for cb in trainer.callback_handler.callbacks if isinstance(cb, LTECallback)), None)
    wall = record.wall_time()
    diverged = guard.diverged_at is not None
    lte = None
    if not diverged:
        if eval_sets and (not record.evals or record.evals[-1]["step"] != trainer.state.global_step):
            trainer.evaluate()  # the curves end at the last step
        if lte_handle is not None:  # the report's held-out losses: the whole sets, in stage hard, neurons counted
            lte = held_out_sparsity(trainer, lte_handle, eval_sets)
        elif any(len(curve_sets[name]) < len(full) for name, full in eval_sets.items()):
            trainer.evaluate(eval_dataset=eval_sets, metric_key_prefix=FULL_EVAL_PREFIX)  # the report's held-out losses
        _save_final(trainer.model, tokenizer, out, lora=cfg.lora is not None, lte=lte_handle)
    extra = {"lte": lte} if mode == "lte" else {}
    report = build_report(
        record,
        mode=mode,
        config=_config_record(cfg, model_path),
        wall_time_s=wall,
        status="diverged" if diverged else "completed",
        diverged_at_step=guard.diverged_at,
        skipped_steps=guard.skipped,
        resumed_from=resume_from,
        sat_calibration=calibration,
        **extra,
    )
    write_report(report, out)
    if diverged:
        raise SATTrainingError(
            f"training diverged at step {guard.diverged_at}: non-finite loss or gradient; final/ not saved, "
            f"report in {out / 'report.json'}; lower training.learning_rate (or allow skipped steps with max_skipped_steps)"
        )
    return report


def time_steps(
    cfg: RunConfig, dense_steps: int, *, calibration: dict | None = None, rounds: int = 5, reuse: bool = False
) -> StepTimes:
    """Dense and SAT step times of this scenario, interleaved in one process (:mod:`.step_timing`), on
    the first training batch, at the rates of SAT's schedule over ``dense_steps`` steps; written to
    ``step_times.json`` in the run folder. ``calibration``: the SAT run's ``layer_rates: auto`` table.
    ``reuse`` (a resumed comparison): the times already in ``step_times.json``, if any, so that the
    equal-time run keeps the step count its checkpoints were made with."""
    path = cfg.output_dir / "step_times.json"
    if reuse and path.is_file():
        return StepTimes.from_dict(json.loads(path.read_text()))
    model_path = model_source(cfg)
    _, model, (train_set, _, collator) = _load(cfg, model_path)
    args = training_arguments(
        cfg.training, has_eval=bool(cfg.data.eval), output_dir=str(cfg.output_dir)
    )  # the run's own arguments
    batch = collator([train_set[i] for i in range(min(args.per_device_train_batch_size, len(train_set)))])
    times = step_timing.measure(
        model, batch, args, cfg.sat, step_timing.timed_rates(cfg.sat, dense_steps), calibration=calibration, rounds=rounds
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(times.to_dict(), indent=2))
    return times


def model_source(cfg: RunConfig) -> str:
    """The folder (or hub name) ``cfg``'s model loads from: a ``builtin:`` model's folder, made on first use; for
    pretrain the initial model of its shape, made on first use."""
    if cfg.task == "pretrain":
        from .scratch import ensure_init

        return str(ensure_init(cfg))
    return resolve_model_path(cfg.model)


def curve_subsets(eval_sets: dict[str, Any], samples: int | None) -> dict[str, Any]:
    """The held-out sets the curves' points are evaluated on: ``samples`` blocks (CPT) or records (SFT)
    of each set, evenly spaced over it (a set's first ones would be its first document only), or the
    whole set when ``samples`` is None or not smaller.

    Why a subset: a point costs a forward pass over every held-out set, and a curve wants many
    points (a time to dense's loss is read off it between points), so on a slow machine whole-set
    points would cost a good part of a short run's time. The curves need a consistent trend, not the
    last digit, so their points use this subset, the final point included (a curve that switched
    sets at its end would jump); the report's held-out losses (the headline numbers) come from one
    more evaluation on the whole sets after the last step.
    """
    if samples is None:
        return eval_sets
    return {
        name: ds.select([i * len(ds) // samples for i in range(samples)]) if samples < len(ds) else ds
        for name, ds in eval_sets.items()
    }


def _load(cfg: RunConfig, source: str) -> tuple[Any, torch.nn.Module, tuple]:
    """(tokenizer, model with LoRA if the scenario has it, (train set, held-out sets, collator)) from ``source``."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    data = sat_data.build_datasets(cfg.task, cfg.data, tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    if cfg.lora is not None:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **cfg.lora))
    return tokenizer, model, data


def _save_final(model: torch.nn.Module, tokenizer, out: Path, *, lora: bool, lte: LTEHandle | None = None) -> None:
    """A plain HF model that loads without sat_trainer (and, for LoRA, the adapter too); never
    one with non-finite weights. ``lte``: the routers are taken off the model first (the merged copy then
    holds no routed forward) and written beside it (``lte.safetensors``, ``lte_config.json``)."""
    remove_sat(model)
    routers = {}
    if lte is not None:
        routers = {f"{b.name}.lte_router.{n}": p for b in lte.blocks for n, p in b.router.named_parameters()}
        lte.remove()
    named = [*model.named_parameters(), *routers.items()]
    broken = [name for name, p in named if not bool(torch.isfinite(p).all())]
    if broken:
        raise SATTrainingError(
            f"final/ not saved: {len(broken)} weight tensors are not finite (first: {broken[0]}); lower training.learning_rate"
        )
    final = out / "final"
    if lora:
        model.save_pretrained(out / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    if lte is not None:
        lte.save(final)


def _config_record(cfg: RunConfig, model_path: str) -> dict[str, Any]:
    return {
        "task": cfg.task,
        "source": cfg.source,
        "model": cfg.model,
        "model_path": model_path,
        "data": vars(cfg.data),
        "training": cfg.training,
        "sat": cfg.sat.to_dict() if cfg.sat is not None else None,
        "lte": cfg.lte.to_dict() if cfg.lte is not None else None,
        "lora": cfg.lora,
        "max_skipped_steps": cfg.max_skipped_steps,
    }
