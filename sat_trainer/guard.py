"""Stop a diverged run before it writes NaN into the weights.

A non-finite loss gives non-finite gradients; the optimizer step would then write NaN into
every weight it touches, and the Trainer would go on "training" to the end (its loss logging
even averages NaN away). :class:`NonFiniteGuard` looks at the gradients just before each
optimizer step: if any is NaN or infinite it drops them all, so the step changes nothing
(optimizers skip parameters without a gradient), and after ``max_skipped`` such steps it stops
the run. The weights stay those of the last finite step.
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

    def on_pre_optimizer_step(self, args, state, control, model: torch.nn.Module | None = None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads])).all()):
            return
        for p in model.parameters():
            p.grad = None
        step = state.global_step + 1
        self.skipped.append(step)
        if len(self.skipped) > self.max_skipped:
            self.diverged_at = step
            control.should_training_stop = True
        else:
            logger.warning(
                "sat_trainer: step %d: non-finite gradient, update skipped (%d of %d allowed)", step, len(self.skipped), self.max_skipped
            )
