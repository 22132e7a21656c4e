"""What the optimizer step does to the slices a step omitted (``omitted_update``), in one place.

The callback calls it around the Trainer's optimizer step, and ``--compare-dense``'s interleaved
step timing around its own, so a timed SAT step costs what a trained one does.

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
* ``momentum_snr``: as ``momentum`` with ``d = 1``, but each element's first moment is first shrunk by
  its signal-to-noise ratio, read from Adam's own moments: ``g = s * m`` with
  ``s = m^2 / (m^2 + sigma^2 (1 - beta1) / (1 + beta1))`` (bias-corrected ``m``, ``sigma^2 = v - m^2``,
  the variance of an EMA of noise with that beta1). Why: a frozen first moment carries the noise of its
  last ~10 gradients as if it were direction, and integrating it for a whole sparse phase is a random
  walk dense training would not take (measured: the omitted slices' extra drift is largely orthogonal to
  dense's; docs/benchmarks.md). Elements whose moment is mostly signal (``s`` near 1) continue as under
  ``momentum``; mostly-noise ones decay each step by ``beta1 + (1 - beta1) s``, as under ``optimizer``.
"""

from __future__ import annotations

import torch

from .errors import SATError
from .patch.model import SATHandle

CONTINUED = ("momentum", "momentum_snr")  # the modes that write the first moment into the omitted gradients


class OmittedUpdate:
    """``before_step(optimizer)`` and ``after_step()`` around one optimizer step of ``handle``'s model."""

    def __init__(self, handle: SATHandle, mode: str, momentum_decay: float = 1.0):
        self.handle = handle
        self.mode = mode
        self.momentum_decay = momentum_decay
        self._frozen: list = []  # freeze: (tensor, dim, omitted indices, saved values)

    def before_step(self, optimizer) -> None:
        if self.mode in CONTINUED:
            continue_momentum(self.handle, optimizer, self.momentum_decay, shrink=self.mode == "momentum_snr")
        elif self.mode == "freeze":
            self._frozen = [(t, dim, idx, t.detach().index_select(dim, idx)) for u in self.handle.units for t, dim, idx in u.omitted_parameters()]

    def after_step(self) -> None:
        with torch.no_grad():
            for tensor, dim, idx, saved in self._frozen:
                tensor.index_copy_(dim, idx, saved)
        self._frozen = []


def continue_momentum(handle: SATHandle, optimizer, decay: float = 1.0, shrink: bool = False) -> None:
    """``momentum``: each omitted slice's gradient becomes the multiple of its optimizer's first moment
    that leaves that moment ``decay`` times what it was after the step; with ``shrink``
    (``momentum_snr``) that moment shrunk elementwise by its signal-to-noise ratio (module docstring)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    states = getattr(inner, "state", None)
    if states is None:
        raise SATError(f"omitted_update 'momentum' needs a torch optimizer with per-parameter state, got {type(inner).__name__}")
    betas = {p: group.get("betas") for group in inner.param_groups for p in group["params"]} if decay != 1.0 or shrink else {}
    with torch.no_grad():
        for unit in handle.units:
            for tensor, dim, idx in unit.omitted_parameters():
                state = states.get(tensor) or {}
                if state and "exp_avg" not in state:
                    raise SATError(f"omitted_update 'momentum' needs an Adam-family optimizer (exp_avg state), got {type(inner).__name__}")
                if "exp_avg" in state and tensor.grad is not None:
                    moment = state["exp_avg"].index_select(dim, idx)
                    if shrink:
                        moment = _shrunk(moment, state, dim, idx, _betas(betas.get(tensor)))
                    moment = moment.to(tensor.grad.dtype)
                    if decay != 1.0:
                        moment.mul_(_moment_scale(decay, _betas(betas.get(tensor))[0]))
                    tensor.grad.index_copy_(dim, idx, moment)


def _betas(betas) -> tuple[float, float]:
    """The optimizer's ``(beta1, beta2)``, checked: the continued update's arithmetic is Adam's."""
    if betas is None or len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise SATError(f"omitted_update momentum_decay / momentum_snr need the optimizer's betas in [0, 1) (param_groups' betas), got {betas!r}")
    return float(betas[0]), float(betas[1])


def _moment_scale(decay: float, beta1: float) -> float:
    """The gradient, as a multiple of the first moment, after which Adam's first moment is ``decay`` times it."""
    return (decay - beta1) / (1.0 - beta1)


def _shrunk(moment: torch.Tensor, state: dict, dim: int, idx: torch.Tensor, betas: tuple[float, float]) -> torch.Tensor:
    """``s * moment``, ``s`` the elementwise signal-to-noise shrink of ``momentum_snr`` (module docstring),
    from the bias-corrected moments; the step count stays a tensor (no host sync)."""
    beta1, beta2 = betas
    step = state["step"]
    m_hat = moment / (1.0 - beta1**step)
    signal = m_hat.square()
    noise = (state["exp_avg_sq"].index_select(dim, idx) / (1.0 - beta2**step) - signal).clamp_min(0.0)
    return moment * signal / (signal + noise * ((1.0 - beta1) / (1.0 + beta1))).clamp_min(torch.finfo(signal.dtype).tiny)
