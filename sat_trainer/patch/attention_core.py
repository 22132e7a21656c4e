"""The attention core's backward for the kept heads only, under ``omit_in: backward``.

With a dense forward, SAT's projections already restrict the backward to the kept units: the
output projection passes no gradient to the omitted heads' outputs, and q/k/v read only the kept
heads' gradients. Between them the attention core (softmax(q k^T) v) would still run its
backward for every head, on an all-zero gradient for the omitted ones. Heads are independent in
the core, so the block's call is split in two: the kept heads' attention with autograd, the
omitted heads' under ``no_grad`` (their outputs are the dense forward's; nothing of them is saved
for backward), and the outputs put back in head order. The gradients are the same as unsplit;
the split's own gathers cost part of the backward it saves.

transformers 5 attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(...)(self, q, k, v,
mask, **kwargs)`` with ``q`` ``(batch, heads, tokens, head_dim)`` and return ``(batch, tokens,
heads, head_dim)``. SAT registers a pass-through wrapper over ``sdpa`` (the default), class-wide
through ``AttentionInterface.register`` (the documented extension point): it splits only a module
that :func:`attach` marked and whose unit says so (:meth:`HeadSplit.backward_heads`); every other
module, model and mode gets the original function unchanged. ``eager`` (a default argument, not
in the registry), flash kernels (unmeasured here) and attention sinks (``s_aux``, per head) run
unsplit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface

_MARK = "_sat_attention_unit"
_SPLIT = ("sdpa",)

Heads = tuple[torch.Tensor, torch.Tensor]  # (query heads, the KV heads they read)


class HeadSplit(Protocol):
    """What a marked block's attention core asks its SAT unit (:class:`sat_trainer.patch.units.BlockUnit`)."""

    def backward_heads(self) -> tuple[Heads, Heads] | None:
        """(kept heads, omitted heads) when the core may run its backward for the kept heads only, else None."""


def attach(block: nn.Module, unit: HeadSplit) -> None:
    """Mark ``block`` so that its attention core splits the heads ``unit`` keeps (see the module docstring)."""
    _install()
    setattr(block, _MARK, unit)


def detach(block: nn.Module) -> None:
    block.__dict__.pop(_MARK, None)


def _install() -> None:
    """Wrap the registry's split-capable functions once per process (idempotent)."""
    for name in _SPLIT:
        inner = AttentionInterface._global_mapping.get(name)
        if inner is not None and not getattr(inner, "_sat_split", False):
            AttentionInterface.register(name, _splitting(inner))


def _splitting(inner: Callable) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
        unit = getattr(module, _MARK, None)
        heads = None if unit is None or not torch.is_grad_enabled() or "s_aux" in kwargs else unit.backward_heads()
        if heads is None:
            return inner(module, query, key, value, attention_mask, **kwargs)
        (kept_q, kept_kv), (omitted_q, omitted_kv) = heads
        with torch.no_grad():
            omitted, _ = inner(module, *_heads(query, key, value, attention_mask, omitted_q, omitted_kv), **kwargs)
        kept, _ = inner(module, *_heads(query, key, value, attention_mask, kept_q, kept_kv), **kwargs)
        out = omitted.new_empty(*omitted.shape[:2], query.shape[1], omitted.shape[3])
        out.index_copy_(2, omitted_q, omitted)
        return out.index_copy(2, kept_q, kept), None

    attention._sat_split = True
    attention.__wrapped__ = inner
    return attention


def _heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    q_heads: torch.Tensor,
    kv_heads: torch.Tensor,
) -> tuple:
    """(q, k, v, mask) of the query heads ``q_heads`` and the KV heads ``kv_heads`` they read; a
    mask shared by all heads as it is."""
    if mask is not None and mask.dim() == 4 and mask.shape[1] > 1:
        mask = mask.index_select(1, q_heads)
    return query.index_select(1, q_heads), key.index_select(1, kv_heads), value.index_select(1, kv_heads), mask
