"""How sparse an LTE model runs on real data: per MLP, the fraction of its neurons computed per token.

:class:`ActiveMeter` hooks every router of an :class:`~sat_trainer.lte.model.LTEHandle` while it is entered and
counts, for each token the model is called on, the fraction of the MLP's experts whose score exceeds the
threshold (experts are equal-size, so this is the fraction of its neurons computed). It works in any stage and
on either forward path (the sparse inference path of :mod:`.inference` and the masked reference both call the
router), unlike the handle's own training-time statistics (:meth:`LTEHandle.active_fractions`), which count
training forwards only. Padding is left out: the ``attention_mask`` the model is called with (as a keyword, as
the ``Trainer`` and ``generate`` do) weighs each token; without one every token counts.

MLPs in ``dense_layers`` have no router and compute every neuron: :meth:`ActiveMeter.summary` lists them at 1,
and its average over all MLP neurons counts them so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..patch.blocks import find_blocks, layer_index
from ..patch.registry import FAMILIES, BlockShape
from .router import is_gated, mlp_width


def gated_mlps(model: nn.Module) -> list[tuple[str, BlockShape, nn.Module]]:
    """(name, shape, block) of every gated MLP of ``model`` in a decoder layer, in model order, routed or not
    (the registry's shapes, as :func:`~sat_trainer.lte.model.apply_lte` finds them)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    shapes = [s for s in FAMILIES.get(model_type, []) if is_gated(s)]
    return [b for b in find_blocks(model, shapes, set()) if layer_index(b[0]) is not None]


class ActiveMeter:
    """Counts the fraction of each routed MLP's neurons computed per (non-padding) token while entered.

    Args:
        model: the model the forwards are called on (bare or PEFT-wrapped; its ``attention_mask`` keyword is read).
        handle: its :class:`~sat_trainer.lte.model.LTEHandle`; the threshold is read at each forward.
    """

    def __init__(self, model: nn.Module, handle: Any):
        self.model, self.handle = model, handle
        self.widths = {layer_index(name): mlp_width(block, shape) for name, shape, block in gated_mlps(model)}
        self._mask: torch.Tensor | None = None
        self._hooks: list = []
        self.reset()

    def reset(self) -> None:
        self.active: dict[int, float] = {}  # per routed layer: the sum over tokens of the fraction computed
        self.tokens: dict[int, float] = {}

    def __enter__(self) -> ActiveMeter:
        self._hooks = [self.model.register_forward_pre_hook(self._read_mask, with_kwargs=True)]
        for block in self.handle.blocks:
            self._hooks.append(block.router.register_forward_hook(self._counter(layer_index(block.name))))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._mask = [], None

    def _read_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def _counter(self, layer: int):
        def count(module: nn.Module, args: tuple, scores: torch.Tensor) -> None:
            per_token = (scores.detach() > self.handle.threshold).float().mean(dim=-1)  # (..., tokens)
            mask = self._mask
            if mask is not None and mask.shape == per_token.shape:
                weight = mask.to(per_token.dtype)
                active, tokens = float((per_token * weight).sum()), float(weight.sum())
            else:
                active, tokens = float(per_token.sum()), float(per_token.numel())
            self.active[layer] = self.active.get(layer, 0.0) + active
            self.tokens[layer] = self.tokens.get(layer, 0.0) + tokens

        return count

    def fractions(self) -> dict[int, float]:
        """Per routed layer that saw a token, the mean fraction of its neurons computed per token."""
        return {layer: self.active[layer] / self.tokens[layer] for layer in sorted(self.active) if self.tokens[layer]}

    def summary(self) -> dict[str, Any]:
        """``layers`` (every gated MLP's layer: its fraction; 1 for an MLP without router), ``routed_fraction``
        (the mean over routed MLPs' neurons), ``mlp_fraction`` (over all MLP neurons, unrouted ones at 1) and
        ``tokens`` counted; fractions are None before any token was counted."""
        measured = self.fractions()
        routed = {layer_index(b.name) for b in self.handle.blocks}
        layers = {layer: (measured.get(layer) if layer in routed else 1.0) for layer in sorted(self.widths)}
        if not measured:
            return {"layers": layers, "routed_fraction": None, "mlp_fraction": None, "tokens": 0}
        routed_width = sum(self.widths[layer] for layer in measured)
        return {
            "layers": layers,
            "routed_fraction": sum(f * self.widths[layer] for layer, f in measured.items()) / routed_width,
            "mlp_fraction": sum((layers[layer] or 0.0) * w for layer, w in self.widths.items()) / sum(self.widths.values()),
            "tokens": int(max(self.tokens.values())),
        }
