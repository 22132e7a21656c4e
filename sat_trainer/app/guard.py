"""Stop a diverged run before it writes NaN into the weights, at no cost to a run that does not diverge.

A non-finite loss gives non-finite gradients; the optimizer step would then write NaN into
every weight it touches, and the Trainer would go on "training" to the end (its loss logging
even averages NaN away). :class:`NonFiniteGuard` skips such steps and, after ``max_skipped`` of
them, stops the run; the weights stay those of the last finite step.

Free on the hot path: the check is one fused norm over the gradients (``torch._foreach_norm``,
a read of the gradients next to the backward pass that wrote them) reduced to a 0-dim flag *on
the device*; nothing is copied to the host per step. The skip itself is done on the device by
the optimizer: torch's fused optimizers (``adamw_torch_fused``, the Trainer's default, and the
other ``fused=True`` Adam/AdamW/SGD) read an ``optimizer.found_inf`` tensor, the mechanism
``torch.amp.GradScaler`` uses, and leave weights *and* their state (moments, step count)
untouched where it is non-zero. That was chosen over zeroing the gradients (``torch.where``),
which would still move every weight by its momentum and weight decay, and over a copy of the
weights to restore (a second model in memory). The flags are read on the host once per
logging, evaluation or save step (when the Trainer itself syncs), so a run that diverges stops
at the next such step; a skipped step and the stop are reported with their exact step numbers.
An optimizer without ``found_inf`` (non-fused, Adafactor, bitsandbytes) cannot skip on the
device: there the flag is read every step and a bad step's gradients are dropped, as before.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

logger = logging.getLogger("sat_trainer")


class NonFiniteGuard(TrainerCallback):
    """Skips optimizer steps with non-finite gradients; stops the run after ``max_skipped`` of them."""

    def __init__(self, max_skipped: int = 0):
        self.max_skipped = max_skipped
        self.skipped: list[int] = []  # optimizer steps (1-based, as logged) whose update was skipped
        self.diverged_at: int | None = None
        self.reads = 0  # host reads of the flags (tests: once per logging step, not per step)
        self._pending: list[tuple[int, torch.Tensor]] = []  # (step, 0-dim flag on the device), not read yet

    def on_pre_optimizer_step(self, args, state, control, model: torch.nn.Module | None = None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        found = torch.stack(torch._foreach_norm(grads)).isfinite().all().logical_not().float()
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        self._pending.append((state.global_step + 1, found))
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.found_inf = found  # the fused step skips the update on the device where found != 0
            return
        if found.item():  # no device-side skip: drop the gradients, so the step changes nothing
            for p in model.parameters():
                p.grad = None
        self._read(control)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save or control.should_training_stop:
            self._read(control)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self._read(control)
        inner = getattr(optimizer, "optimizer", optimizer)
        if hasattr(inner, "found_inf"):
            del inner.found_inf  # a later step outside this run must not reuse the last flag

    def _read(self, control) -> None:
        """Copy the pending flags to the host (one transfer) and account for the skipped steps."""
        if not self._pending:
            return
        self.reads += 1
        flags = torch.stack([f for _, f in self._pending]).tolist()
        steps = [s for s, _ in self._pending]
        self._pending.clear()
        for step, bad in zip(steps, flags):
            if not bad:
                continue
            self.skipped.append(step)
            if len(self.skipped) > self.max_skipped:
                self.diverged_at = self.diverged_at or step
                control.should_training_stop = True
            else:
                logger.warning(
                    "sat_trainer: step %d: non-finite gradient, update skipped (%d of %d allowed)",
                    step,
                    len(self.skipped),
                    self.max_skipped,
                )
