"""Whole decoder layers as units (``targets: [layers]``): each draw skips a random subset of them, as EST does.

A skipped layer is the identity: it returns its hidden-state input and runs nothing (no norm, no attention, no
MLP), so its time is saved and its parameters get no gradient (None, as in the reference whose layer output is
replaced by its input). Only a training forward with gradients enabled skips: ``eval()``, ``generate`` (no
gradients) and every KV cache see every layer.

DESIGN section 5 says never to replace a decoder layer's forward: ``GradientCheckpointingLayer`` wraps the
*class's* forward. This binds a forward on the layer *instance* instead, which calls the class's forward (looked up
at each call: FSDP2 swaps the class) whenever the layer runs; so checkpointing, module hooks and wrappers stay as
they are, and a skipped layer calls no checkpoint function at all. Every registered family's decoder layer returns
its hidden states as one tensor (transformers 5.25); a layer that returns anything else is refused when it first runs.

The skipped set of a draw is a uniformly random subset of the eligible layers (all but ``dense_layers``) of size
n - k, k = ``kept_count(n, rate)``: from a CPU generator seeded by (seed, draw number, :data:`LAYER_STREAM`), so it is
the same on every rank and after a resume, and drawing it needs no device sync.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .. import selection
from ..errors import SATError
from ..schedule import kept_count
from .forward_context import ForwardContext

LAYER_STREAM = -1  # the unit index the layer draw is seeded with (block units are numbered from 0)


class LayerSkip:
    """The decoder layers a draw may skip, and their patched forwards.

    Args:
        layers: (index, name, module) of every eligible decoder layer (:func:`~sat_trainer.patch.blocks.decoder_layers`).
        context: the model's shared per-forward state (rate of ``layers``, draw number, seed).
    """

    def __init__(self, layers: list[tuple[int, str, nn.Module]], context: ForwardContext):
        self.layers = layers
        self.context = context
        self._drawn: tuple[tuple[int, int], frozenset[int]] | None = None  # ((draw number, kept count), skipped)
        self._saved_forwards: list[tuple[nn.Module, Callable | None]] = []

    def patch(self) -> None:
        """Bind the skipping forward on every eligible layer instance."""
        for index, name, module in self.layers:
            previous = module.__dict__.get("forward")
            self._saved_forwards.append((module, previous))
            module.forward = functools.partial(_layer_forward, self, index, name, module, previous)

    def unpatch(self) -> None:
        """Put back what the layer instances had (usually no forward of their own)."""
        for module, previous in reversed(self._saved_forwards):
            del module.forward
            if previous is not None:
                module.forward = previous
        self._saved_forwards.clear()

    def k(self) -> int:
        """Layers kept at the current rate (at least one)."""
        return kept_count(len(self.layers), self.context.rate_for("layers"))

    @torch.compiler.disable
    def skipped(self) -> frozenset[int]:
        """Indices of the layers the current draw skips (none at rate 0); drawn once per (draw number, kept count)."""
        n, k = len(self.layers), self.k()
        if k >= n:
            return frozenset()
        key = (self.context.draw_id, k)
        if self._drawn is None or self._drawn[0] != key:
            generator = selection.generator_for(self.context.config.seed, key[0], LAYER_STREAM)
            order = torch.randperm(n, generator=generator)[: n - k].tolist()
            self._drawn = (key, frozenset(self.layers[i][0] for i in order))
        return self._drawn[1]

    def skips(self, index: int, module: nn.Module) -> bool:
        """Whether layer ``index`` is skipped now: a training forward with gradients, and drawn to be skipped."""
        return module.training and torch.is_grad_enabled() and index in self.skipped()


def _layer_forward(
    skip: LayerSkip, index: int, name: str, module: nn.Module, previous: Callable | None, *args, **kwargs
) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    skip.context.note_sequence_length(hidden)  # for the FLOP count, also when no block is patched
    if skip.skips(index, module):
        return hidden
    out = previous(*args, **kwargs) if previous is not None else type(module).forward(module, *args, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise SATError(
            f"{name} ({type(module).__name__}) returns {type(out).__name__}, not its hidden states as one tensor; "
            "targets 'layers' can skip only decoder layers that do (leave layers out of targets)"
        )
    return out
