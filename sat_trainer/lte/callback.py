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
  ``lte_config.json``) beside the plain model, so any checkpoint loads with :func:`~sat_trainer.lte.model.load_lte`.

Not covered yet: restoring the routers when a run resumes from a checkpoint, and DDP's check for parameters that
stop receiving gradients (the routers in stage 2) without ``ddp_find_unused_parameters``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .config import LTEConfig, to_lte_config
from .model import LTEHandle, _layer_index, apply_lte, lte_handle_of

logger = logging.getLogger("sat_trainer")


class LTECallback(TrainerCallback):
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

    def on_init_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None:
            self._attach(model, args)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise RuntimeError("LTECallback needs the Trainer to pass the model to its callbacks")
        self._attach(model, args)  # a model built by Trainer(model_init=...) after on_init_end
        self.switch_step = round(self.config.soft_fraction * state.max_steps)
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
                extra[f"lte/active_fraction/layer_{_layer_index(name)}"] = round(fraction, 6)
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

    def _set_stage(self, step: int) -> None:
        stage = "soft" if step < (self.switch_step or 0) else "hard"
        if stage != self.handle.stage:
            self.handle.set_stage(stage)
            logger.info("sat_trainer: LTE stage %s from step %d", stage, step)
