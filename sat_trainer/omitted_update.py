"""What the optimizer step does to the slices a step omitted (``omitted_update``), in one place.

The callback calls it around the Trainer's optimizer step, and ``--compare-dense``'s interleaved
step timing around its own, so a timed SAT step costs what a trained one does.

* ``optimizer``: nothing; the omitted slices have a zero gradient and the optimizer moves them by
  its momentum and weight decay.
* ``freeze``: their values are saved before the step and written back after it.
* ``momentum``: before the step their gradient becomes the optimizer's first moment (``exp_avg``),
  so AdamW keeps moving them in their recent direction (the first moment then stays as it was; the
  second moment takes its square). Slices without that state yet (the first step) keep their zero
  gradient.
"""

from __future__ import annotations

import torch

from .errors import SATError
from .patch.model import SATHandle


class OmittedUpdate:
    """``before_step(optimizer)`` and ``after_step()`` around one optimizer step of ``handle``'s model."""

    def __init__(self, handle: SATHandle, mode: str):
        self.handle = handle
        self.mode = mode
        self._frozen: list = []  # freeze: (tensor, dim, omitted indices, saved values)

    def before_step(self, optimizer) -> None:
        if self.mode == "momentum":
            continue_momentum(self.handle, optimizer)
        elif self.mode == "freeze":
            self._frozen = [(t, dim, idx, t.detach().index_select(dim, idx)) for u in self.handle.units for t, dim, idx in u.omitted_parameters()]

    def after_step(self) -> None:
        with torch.no_grad():
            for tensor, dim, idx, saved in self._frozen:
                tensor.index_copy_(dim, idx, saved)
        self._frozen = []


def continue_momentum(handle: SATHandle, optimizer) -> None:
    """``momentum``: each omitted slice's gradient becomes its optimizer's first moment."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    states = getattr(inner, "state", None)
    if states is None:
        raise SATError(f"omitted_update 'momentum' needs a torch optimizer with per-parameter state, got {type(inner).__name__}")
    with torch.no_grad():
        for unit in handle.units:
            for tensor, dim, idx in unit.omitted_parameters():
                state = states.get(tensor) or {}
                if state and "exp_avg" not in state:
                    raise SATError(f"omitted_update 'momentum' needs an Adam-family optimizer (exp_avg state), got {type(inner).__name__}")
                if "exp_avg" in state and tensor.grad is not None:
                    tensor.grad.index_copy_(dim, idx, state["exp_avg"].index_select(dim, idx).to(tensor.grad.dtype))
