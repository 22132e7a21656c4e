"""`SATCallback`: SAT inside `transformers.Trainer` with one added line.

Lifecycle (the Trainer wraps the model for accelerate/DDP/FSDP/DeepSpeed *before*
``on_train_begin``, so patching happens at ``on_init_end``, on the bare model):

* ``on_init_end``: :func:`apply_sat` on the model.
* ``on_step_begin``: the schedule gives this optimizer step's omission rate (schedule est: one per target); a new draw number
  makes the next forward draw a new kept set, reused by the step's other micro-batches and by
  gradient-checkpoint recompute (``draw_every: micro_batch`` draws again per micro-batch).
* ``on_log``: adds ``sat/omission_rate``, ``sat/kept_flops_fraction`` and
  ``sat/tokens_per_second`` (tokens over time inside training steps since the last log, so
  evaluation pauses do not count) to training log rows (and to ``state.log_history``); under schedule est
  also ``sat/omission_rate_<target>`` per target.
* ``on_pre_optimizer_step`` / ``on_optimizer_step``: ``omitted_update`` ``freeze`` or ``momentum``
  acts on the omitted slices around the optimizer step (:mod:`sat_trainer.omitted_update`).
* ``layer_rates: auto``: at ``on_train_begin`` the first ``calibration_batches`` batches of the
  training set (read from the dataset and collator, so the sampler's order is untouched) calibrate
  per-block peak rates (:mod:`sat_trainer.calibration`); the table is ``callback.calibration``
  and travels in checkpoints, so a resumed run keeps its rates without calibrating again.
* checkpoints: the draw counter is saved through ``ExportableState`` and restored on resume
  (with or without ``restore_callback_states_from_checkpoint``); the schedule position is the
  Trainer's own ``global_step``.

Evaluation runs in ``eval()`` mode, where the patched projections run their original forwards.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .config import SATConfig, to_config
from .errors import SATError
from .first_batches import first_batches
from .patch.model import SATHandle, apply_sat, handle_of
from .schedule import step_rates
from .step_driver import StepDriver

logger = logging.getLogger("sat_trainer")


class SATCallback(TrainerCallback, ExportableState):
    """Runs SAT in a Trainer: ``Trainer(..., callbacks=[SATCallback(cfg)])`` (see the module docstring).

    It patches the model at ``on_init_end`` (:func:`apply_sat`), drives each optimizer step with a
    :class:`~sat_trainer.step_driver.StepDriver`, and adds SAT's columns to the training logs.
    ``handle`` is the patched model's :class:`SATHandle`; ``calibration`` the ``layer_rates: auto``
    table (None otherwise); ``draw_id`` the latest draw number.

    Args:
        config: a :class:`SATConfig`, a mapping of its keys, a YAML path, or None (defaults).

    Raises:
        SATConfigError: ``config`` has an unknown key or a bad value.
    """

    def __init__(self, config: SATConfig | dict[str, Any] | str | Path | None = None):
        self.config: SATConfig = to_config(config)
        self.handle: SATHandle | None = None
        self._driver: StepDriver | None = None  # built with the handle, in _attach
        self._resumed_draw_id = 0  # the checkpoint's draw number, until the driver continues from it
        self._tokens = 0
        self._busy = 0.0  # seconds inside training steps since the last log (evaluation excluded)
        self._step_start = 0.0
        self._hook = None
        self.calibration: dict | None = None  # layer_rates auto: the calibration table
        self._saved_scores: dict | None = None  # resumed: the checkpoint's score state, loaded once the model is patched

    @property
    def draw_id(self) -> int:
        """The latest draw number (saved in checkpoints, so a resumed run continues the same draws)."""
        return self._driver.draw_id if self._driver is not None else self._resumed_draw_id

    @draw_id.setter
    def draw_id(self, value: int) -> None:  # a checkpoint's (the Trainer sets saved attributes on a rebuilt callback)
        self._resumed_draw_id = value
        if self._driver is not None:
            self._driver.draw_id = value

    # ---- ExportableState ------------------------------------------------------------------

    def state(self) -> dict:
        rate = self.handle.rate if self.handle is not None else 0.0
        scores = self.handle.score_state() if self.handle is not None else None
        return {
            "args": {"config": self.config.to_dict()},
            "attributes": {"draw_id": self.draw_id, "last_rate": rate, "calibration": self.calibration, "scores": scores},
        }

    # ---- Trainer events -------------------------------------------------------------------

    def on_init_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None:
            self._attach(model)
            if _zero3():
                _name_leaf_modules_in_deepspeed_config(args, self.handle)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise RuntimeError("SATCallback needs the Trainer to pass the model to its callbacks")
        if self.config.omitted_update in ("freeze", "momentum") and getattr(args, "deepspeed", None):
            raise SATError(
                f"omitted_update {self.config.omitted_update!r} cannot run under DeepSpeed: accelerate runs the DeepSpeed engine's optimizer "
                "step inside backward, before on_pre_optimizer_step could reach the omitted slices (and under ZeRO-3 "
                "they are empty shards outside forward); use omitted_update 'optimizer'"
            )
        if self.config.omitted_update == "momentum" and getattr(args, "fp16", False) and not getattr(args, "max_grad_norm", 0):
            raise SATError(
                "omitted_update 'momentum' under fp16 needs max_grad_norm > 0: without clipping the gradients are still "
                "loss-scaled at on_pre_optimizer_step, and the first moment written into them would be unscaled once more "
                "by the optimizer step; set max_grad_norm or train in bf16"
            )
        _refuse_skipped_layers_without_unused_parameters(self.config, args, model)
        self._restore(state)
        self._attach(model)
        if self._saved_scores:  # resumed: the scores the uninterrupted run would draw from
            self.handle.load_score_state(self._saved_scores)
            self._saved_scores = None
        if self.config.layer_rates == "auto":
            self._calibrate(model, args, kwargs.get("train_dataloader"))
        embeddings = model.get_input_embeddings()
        if self._hook is None and embeddings is not None:
            self._hook = embeddings.register_forward_pre_hook(self._count_tokens)

    def on_step_begin(self, args, state, control, **kwargs):
        self._driver.begin_step(step_rates(self.config, state.global_step, state.max_steps))
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._busy += time.perf_counter() - self._step_start

    def on_substep_end(self, args, state, control, **kwargs):
        self._driver.micro_batch_done()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._driver.before_optimizer_step(kwargs.get("optimizer"))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._driver.after_optimizer_step()

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if logs is None or "loss" not in logs or self.handle is None:
            return
        extra = {
            "sat/omission_rate": round(self.handle.rate, 6),
            **{f"sat/omission_rate_{t}": round(r, 6) for t, r in (self.handle.context.axis_rates or {}).items()},
            "sat/kept_flops_fraction": round(self.handle.kept_flops_fraction(), 6),
            "sat/tokens_per_second": round(self._tokens / max(self._busy, 1e-9), 2),
        }
        self._tokens, self._busy = 0, 0.0
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ---- internals ------------------------------------------------------------------------

    def _attach(self, model: nn.Module) -> None:
        """Patch the model the Trainer trains, once; a callback rebuilt by the Trainer on resume
        adopts the existing patch.

        With ``Trainer(model_init=...)`` the Trainer builds a new model inside ``train()``, after
        ``on_init_end``; transformers 5.x calls no callback between building and wrapping it, so
        ``on_train_begin`` patches it (and the handle follows it). That is safe for single
        process, DDP and FSDP2 (SAT binds forwards on projection instances, which these wrappers
        keep). DeepSpeed ZeRO-3 reads its leaf modules when the engine is built, before this
        callback sees the new model: ``on_init_end`` names the blocks' classes in the DeepSpeed
        config (``zero_optimization.leaf_module.classes``) so that the engine makes them leaves,
        and this checks that it did.
        """
        handle = handle_of(model)
        if handle is None:
            handle = apply_sat(model, self.config)
            if self.handle is not None and _zero3():
                _require_engine_leaves(model, handle)
            logger.info(
                "sat_trainer: %d MLP and %d attention blocks patched",
                sum(u.kind == "mlp" for u in handle.units),
                sum(u.kind == "attention" for u in handle.units),
            )
        self._driver = StepDriver(handle, self.config, draw_id=self.draw_id)
        self.handle = handle

    def _restore(self, state) -> None:
        """On resume, continue the draw counter saved in the checkpoint's trainer state.

        Read from ``state.stateful_callbacks`` directly, so it works whether or not the Trainer's
        ``restore_callback_states_from_checkpoint`` (off by default) rebuilt this callback.
        """
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0]
        if state.global_step > 0 and self.draw_id == 0 and saved:
            self.draw_id = int(saved["attributes"]["draw_id"])
            self.calibration = saved["attributes"].get("calibration")
            self._saved_scores = saved["attributes"].get("scores")
            if saved["args"]["config"] != self.config.to_dict():
                logger.warning("sat_trainer: resuming with SAT settings that differ from the checkpoint's")

    def _calibrate(self, model: nn.Module, args, dataloader) -> None:
        from .calibration import apply_table, calibrate

        if self.calibration is not None:  # resumed: the checkpoint's rates
            apply_table(self.handle, self.calibration)
            return
        if dataloader is None:
            raise SATError("layer_rates auto needs the Trainer's train_dataloader at on_train_begin to calibrate on")
        batches = first_batches(dataloader, self.config.calibration_batches, args, model)
        if not batches:
            raise SATError("layer_rates auto: the training set has no examples to calibrate on")
        self.calibration = calibrate(self.handle, model, batches)

    def _count_tokens(self, module: nn.Module, inputs: tuple) -> None:
        if module.training and inputs and hasattr(inputs[0], "numel"):
            self._tokens += inputs[0].numel()


def _refuse_skipped_layers_without_unused_parameters(config: SATConfig, args, model: nn.Module) -> None:
    """targets layers under DDP: a skipped layer's parameters get no gradient, which DDP allows only with
    ``find_unused_parameters``; the Trainer turns it off under activation checkpointing unless
    ``ddp_find_unused_parameters`` says otherwise (transformers 5.25's rule, repeated here to refuse before a hang)."""
    if "layers" not in config.targets or not _ddp():
        return
    find_unused = args.ddp_find_unused_parameters
    if find_unused is None:
        checkpointing = getattr(model, "is_activation_checkpointing", False) or getattr(args, "activation_checkpointing", False)
        find_unused = not checkpointing
    if not find_unused:
        raise SATError(
            "SAT config key 'targets' includes 'layers' under DDP with ddp_find_unused_parameters off (the Trainer's "
            "default with activation checkpointing): a skipped layer's parameters get no gradient and DDP would wait "
            "for them; set ddp_find_unused_parameters=True (non-reentrant checkpointing supports it)"
        )


def _ddp() -> bool:
    """Whether accelerate runs this process under DDP (a ``MULTI_*`` distributed type; not FSDP or DeepSpeed)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if not AcceleratorState._shared_state:
        return False
    return AcceleratorState().distributed_type in {t for t in DistributedType if t.name.startswith("MULTI_")}


def _zero3() -> bool:
    from transformers.integrations import deepspeed as hf_deepspeed

    return hf_deepspeed.is_deepspeed_zero3_enabled()


def _name_leaf_modules_in_deepspeed_config(args, handle: SATHandle) -> None:
    """Add the patched blocks' classes to ``zero_optimization.leaf_module.classes`` of the Trainer's
    DeepSpeed config (kept with DeepSpeed's default leaf classes), so an engine built later, on a
    model the Trainer builds with ``model_init``, makes them leaves (DeepSpeed >= 0.18 reads this
    key; older versions ignore it and :func:`_require_engine_leaves` refuses)."""
    ds_config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if not isinstance(ds_config, dict):
        return
    try:
        from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES
    except ImportError:
        return
    leaf = ds_config.setdefault("zero_optimization", {}).setdefault("leaf_module", {})
    classes = list(leaf.get("classes") or DEFAULT_LEAF_MODULE_CLASSES)
    for cls in sorted({type(u.block) for u in handle.units}, key=lambda c: c.__qualname__):
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name not in classes:
            classes.append(name)
    leaf["classes"] = classes


def _require_engine_leaves(model: nn.Module, handle: SATHandle) -> None:
    """Refuse a model wrapped by a ZeRO-3 engine that did not make every patched block a leaf
    (DeepSpeed marks a leaf's parameters with ``ds_z3_leaf_module`` when it registers the model)."""
    missing = [u.name for u in handle.units if not all(hasattr(p, "ds_z3_leaf_module") for p in u.block.parameters())]
    if missing:
        from .patch.model import remove_sat

        remove_sat(model)
        raise SATError(
            "SATCallback cannot patch a model built by Trainer(model_init=...) under DeepSpeed ZeRO-3: the engine, "
            f"built before any callback sees the model, did not make {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''} ZeRO-3 leaf modules (add their classes to the DeepSpeed config's "
            "zero_optimization.leaf_module.classes, DeepSpeed >= 0.18, or pass model=...)"
        )
