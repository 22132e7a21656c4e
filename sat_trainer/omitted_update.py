"""What the optimizer step does to the slices a step omitted (``omitted_update``), in one place.

The step driver (:class:`sat_trainer.step_driver.StepDriver`) calls it around every optimizer step,
the Trainer's and ``--compare-dense``'s timed ones alike.

* ``optimizer``: nothing; the omitted slices have a zero gradient and the optimizer moves them by
  its momentum and weight decay.
* ``freeze``: their values are saved before the step and written back after it.
* ``momentum``: before the step their gradient is set so that the optimizer's first moment
  (``exp_avg``) becomes ``momentum_decay`` times what it was: ``g = (d - beta1) / (1 - beta1) * m``,
  since Adam's update is ``m <- beta1 * m + (1 - beta1) * g``. With ``d = 1`` the gradient is the
  first moment itself and AdamW keeps moving them in their recent direction for as long as they stay
  omitted; with ``d = beta1`` it is zero (``optimizer``); between, the continued update fades. The
  second moment takes the square. Slices without that state yet (the first step) keep their zero
  gradient.
"""

from __future__ import annotations

import torch

from .errors import SATError
from .patch.model import SATHandle


class OmittedUpdate:
    """``before_step(optimizer)`` and ``after_step()`` around one optimizer step of ``handle``'s model."""

    def __init__(self, handle: SATHandle, mode: str, momentum_decay: float = 1.0):
        self.handle = handle
        self.mode = mode
        self.momentum_decay = momentum_decay
        self._frozen: list = []  # freeze: (tensor, dim, omitted indices, saved values)

    def before_step(self, optimizer) -> None:
        if self.mode == "momentum":
            continue_momentum(self.handle, optimizer, self.momentum_decay)
        elif self.mode == "freeze":
            self._frozen = [
                (t, dim, idx, t.detach().index_select(dim, idx))
                for u in self.handle.units
                for t, dim, idx in u.omitted_parameters()
            ]

    def after_step(self) -> None:
        with torch.no_grad():
            for tensor, dim, idx, saved in self._frozen:
                tensor.index_copy_(dim, idx, saved)
        self._frozen = []


def continue_momentum(handle: SATHandle, optimizer, decay: float = 1.0) -> None:
    """``momentum``: each omitted slice's gradient becomes the multiple of its optimizer's first moment
    that leaves that moment ``decay`` times what it was after the step (see the module docstring)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    states = getattr(inner, "state", None)
    if states is None:
        raise SATError(f"omitted_update 'momentum' needs a torch optimizer with per-parameter state, got {type(inner).__name__}")
    beta1 = {p: group.get("betas", (None,))[0] for group in inner.param_groups for p in group["params"]} if decay != 1.0 else {}
    with torch.no_grad():
        for unit in handle.units:
            for tensor, dim, idx in unit.omitted_parameters():
                state = states.get(tensor) or {}
                if state and "exp_avg" not in state:
                    raise SATError(
                        f"omitted_update 'momentum' needs an Adam-family optimizer (exp_avg state), got {type(inner).__name__}"
                    )
                if "exp_avg" in state and tensor.grad is not None:
                    moment = state["exp_avg"].index_select(dim, idx).to(tensor.grad.dtype)
                    if decay != 1.0:
                        moment.mul_(_moment_scale(decay, beta1.get(tensor)))
                    tensor.grad.index_copy_(dim, idx, moment)


def _moment_scale(decay: float, beta1: float | None) -> float:
    """The gradient, as a multiple of the first moment, after which Adam's first moment is ``decay`` times it."""
    if beta1 is None or not 0.0 <= beta1 < 1.0:
        raise SATError(f"momentum_decay {decay} needs the optimizer's beta1 in [0, 1) (param_groups' betas), got {beta1!r}")
    return (decay - beta1) / (1.0 - beta1)
