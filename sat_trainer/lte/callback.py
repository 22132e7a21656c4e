"""`LTECallback`: LTE's two stages inside one `transformers.Trainer` run, with one added line.

* ``on_init_end``: :func:`~sat_trainer.lte.model.apply_lte` on the bare model (before the Trainer builds its
  optimizer, so the routers, submodules of their MLPs, are among ``model.parameters()`` and the Trainer's own
  optimizer, learning-rate schedule, gradient clipping and checkpointed optimizer state cover them).
* ``on_step_begin``: stage ``soft`` for the first ``round(soft_fraction * max_steps)`` optimizer steps, then
  ``hard`` (routers frozen; the optimizer skips parameters without a gradient).
* the stage-1 losses are added to the model's loss by the handle's forward hook (no change to the loss code);
  this callback tells it the gradient-accumulation steps, so a loss the Trainer does not divide again
  (normalised by ``num_items_in_batch``) gets the terms at the same weight.
* ``on_log``: ``lte/hard`` (0 or 1), ``lte/active_fraction`` (mean over routed MLPs of the fraction of neurons
  whose expert is over the threshold, over the training forwards since the last log) and the same per layer
  (``lte/active_fraction/layer_<i>``), and in stage 1 ``lte/efficiency_loss`` and ``lte/separability_loss``.
* ``on_save``: the routers and expert orders go into the checkpoint folder (``lte.safetensors`` +
  ``lte_config.json``) beside the plain model, so any checkpoint loads with :func:`~sat_trainer.lte.model.load_lte`;
  the trainer state records a digest of them (``ExportableState``).
* resume (``on_train_begin`` at a step above 0): the model's weights and the optimizer state are the Trainer's to
  load; the routers are not in the model's state dict, so this copies the checkpoint's routers and expert orders
  into the routers built at ``on_init_end``, in place (the optimizer holds the same parameter objects, so its
  loaded state for them lines up), and sets the stage of the resumed step. The checkpoint folder is the one the
  Trainer resumes from (its ``resume_from_checkpoint`` argument), else ``args.resume_from_checkpoint``, else
  ``output_dir/checkpoint-<step>``; the one whose files match the digest in the trainer state is used. LTE settings
  that differ from the checkpoint's are refused (:class:`~sat_trainer.lte.errors.LTEConfigError`).
* DDP: the routers stop receiving gradients in stage 2, which DDP accepts only with ``find_unused_parameters``;
  a multi-process run that reaches stage 2 without it is refused at ``on_train_begin``.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..first_batches import first_batches
from ..patch.blocks import layer_index
from .config import LTEConfig, to_lte_config
from .errors import LTEError
from .model import CONFIG_NAME, WEIGHTS_NAME, LTEHandle, apply_lte, lte_handle_of

logger = logging.getLogger("sat_trainer")


class LTECallback(TrainerCallback, ExportableState):
    """Runs LTE in a Trainer: ``Trainer(..., callbacks=[LTECallback(cfg)])`` (see the module docstring).

    ``handle`` is the model's :class:`~sat_trainer.lte.model.LTEHandle`; ``switch_step`` the first optimizer step
    of stage 2 (None until training starts).

    Args:
        config: an :class:`LTEConfig`, a mapping of its keys, a YAML path, or None (defaults).

    Raises:
        LTEConfigError: ``config`` has an unknown key or a bad value.
    """

    def __init__(self, config: LTEConfig | dict[str, Any] | str | Path | None = None):
        self.config: LTEConfig = to_lte_config(config)
        self.handle: LTEHandle | None = None
        self.switch_step: int | None = None
        self.resumed_from: str | None = None  # the checkpoint folder whose routers a resumed run continues from

    # ---- ExportableState ------------------------------------------------------------------

    def state(self) -> dict:
        digest = self.handle.digest() if self.handle is not None else None
        return {"args": {"config": self.config.to_dict()}, "attributes": {"saved_digest": digest}}

    # ---- Trainer events -------------------------------------------------------------------

    def on_init_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None:
            self._attach(model, args)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise RuntimeError("LTECallback needs the Trainer to pass the model to its callbacks")
        self._attach(model, args)  # a model built by Trainer(model_init=...) after on_init_end
        self.switch_step = round(self.config.soft_fraction * state.max_steps)
        if self.switch_step < state.max_steps:
            _check_ddp(args, model)
        if state.global_step > 0:
            self._resume(args, state)
        elif self.config.router_init == "activations":
            self._fit(args, model, kwargs.get("train_dataloader"))
        self._set_stage(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set_stage(state.global_step)

    def on_log(self, args, state, control, logs: dict | None = None, **kwargs):
        if logs is None or "loss" not in logs or self.handle is None:
            return
        extra: dict[str, float] = {"lte/hard": float(self.handle.stage == "hard")}
        fractions = self.handle.active_fractions()
        if fractions:
            extra["lte/active_fraction"] = round(sum(fractions.values()) / len(fractions), 6)
            for name, fraction in fractions.items():
                extra[f"lte/active_fraction/layer_{layer_index(name)}"] = round(fraction, 6)
        extra.update({f"lte/{k}": round(v, 6) for k, v in self.handle.stage1_losses().items()})
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(extra)

    def on_save(self, args, state, control, **kwargs):
        if self.handle is not None and state.is_world_process_zero:
            self.handle.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))

    def _attach(self, model: nn.Module, args) -> None:
        handle = lte_handle_of(model)
        if handle is None:
            handle = apply_lte(model, self.config)
        handle.accumulation_scale = 1.0 / max(int(getattr(args, "gradient_accumulation_steps", 1) or 1), 1)
        self.handle = handle

    def _fit(self, args, model: nn.Module, dataloader) -> None:
        """``router_init: activations``: fit the routers on the first training batches before the first step."""
        if dataloader is None:
            raise LTEError("router_init activations needs the Trainer's train_dataloader at on_train_begin to fit on")
        batches = first_batches(dataloader, self.config.calibration_batches, args, model)
        if not batches:
            raise LTEError("router_init activations: the training set has no examples to fit the routers on")
        tokens = self.handle.fit_routers(batches)
        logger.info("sat_trainer: LTE routers fitted to the dense activations of %d tokens", tokens)

    def _resume(self, args, state) -> None:
        """Install the routers and expert orders of the checkpoint this run resumes from (see the module docstring)."""
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        digest = (saved or {}).get("attributes", {}).get("saved_digest")
        tried = []
        for folder in _checkpoint_candidates(args, state.global_step):
            if folder in tried:
                continue
            tried.append(folder)
            if not (os.path.isfile(os.path.join(folder, WEIGHTS_NAME)) and os.path.isfile(os.path.join(folder, CONFIG_NAME))):
                continue
            self.handle.restore(folder)
            if digest is None or self.handle.digest() == digest:
                self.resumed_from = folder
                logger.info("sat_trainer: LTE routers restored from %s (step %d)", folder, state.global_step)
                return
        raise LTEError(
            f"LTE cannot resume at step {state.global_step}: no {WEIGHTS_NAME} and {CONFIG_NAME} of this run's checkpoint "
            f"in {', '.join(tried) or 'any folder'}; without them the routers would restart from new ones. Pass the "
            "checkpoint folder as TrainingArguments.resume_from_checkpoint too"
        )

    def _set_stage(self, step: int) -> None:
        stage = "soft" if step < (self.switch_step or 0) else "hard"
        if stage != self.handle.stage:
            self.handle.set_stage(stage)
            logger.info("sat_trainer: LTE stage %s from step %d", stage, step)


def _checkpoint_candidates(args, step: int) -> list[str]:
    """Where the checkpoint of a run resumed at ``step`` may be: the folder the Trainer is resuming from (its
    ``train(resume_from_checkpoint=...)`` argument, read from the calling frame: callbacks are not told it),
    ``args.resume_from_checkpoint``, and ``output_dir/checkpoint-<step>`` (where ``resume_from_checkpoint=True`` looks)."""
    found = []
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop":
            value = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(value, (str, os.PathLike)):
                found.append(os.fspath(value))
            break
        frame = frame.f_back
    del frame
    explicit = getattr(args, "resume_from_checkpoint", None)
    if isinstance(explicit, (str, os.PathLike)):
        found.append(os.fspath(explicit))
    if getattr(args, "output_dir", None):
        found.append(os.path.join(args.output_dir, f"checkpoint-{step}"))
    return found


def _check_ddp(args, model: nn.Module) -> None:
    """Refuse a multi-process DDP run that reaches stage 2 without ``find_unused_parameters``: the routers stop
    receiving gradients there, and DDP then fails (it waits for their gradients) at the first stage-2 step."""
    if int(getattr(args, "world_size", 1) or 1) <= 1:
        return
    find_unused = getattr(args, "ddp_find_unused_parameters", None)
    if find_unused is None:  # the Trainer's own default (Trainer._build_accelerator_args)
        checkpointing = bool(getattr(model, "is_activation_checkpointing", False)) or bool(
            getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False)
        )
        find_unused = not checkpointing
    if not find_unused:
        raise LTEError(
            f"LTE in a {args.world_size}-process run needs ddp_find_unused_parameters=True: the routers are frozen in "
            "stage 2 (soft_fraction < 1) and receive no gradient, which DistributedDataParallel rejects unless it "
            "looks for unused parameters; set TrainingArguments(ddp_find_unused_parameters=True) (with activation "
            "checkpointing, use its non-reentrant form)"
        )
