"""Training-free per-token MLP sparsity of a dense model: what LTE's learned routers are measured against.

Both baselines mask the input of each gated MLP's output projection, ``h = act(gate(x)) * up(x)``, per token, by a
forward pre-hook on ``down`` (the registry's ``output``): every neuron is still computed, so they measure quality
only, never speed.

* :class:`TopKMask`: each token keeps the ``k = round(fraction * n)`` neurons of largest ``|h_j|`` (its own
  activations' top-k; ties go to the lower index, as ``torch.topk`` picks). At fraction 1 nothing is masked and the
  model is the dense model exactly.
* :class:`TopKExperts`: the oracle of a router with experts: the MLP's neurons grouped as LTE groups them
  (balanced k-means of the gate and up rows, ``expert_size`` each), and each token keeps the
  ``round(fraction * experts)`` experts whose activations have the largest norm. No router of that expert size can
  choose better for a token than its own activations do, so this is the floor a trained LTE model is judged against
  at its expert size, where :class:`TopKMask` is the floor at single neurons. Another grouping (neurons that
  fire together: :func:`~sat_trainer.lte.experts.coactivation_features`) can be passed in.
* :class:`RandomExperts`: each MLP's neurons are grouped into equal-size experts at random (a seeded permutation)
  and each token keeps ``round(fraction * experts)`` experts drawn uniformly at random, independently per token.

The masks apply to every gated MLP except those of ``dense_layers`` (so they can follow an LTE run's layers).
Each records the fraction it kept per token (``kept_fraction()``), the same quantity
:class:`~sat_trainer.lte.measure.ActiveMeter` reads off an LTE model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..patch.blocks import layer_index
from .experts import expert_energy, group_neurons
from .measure import gated_mlps
from .router import mlp_width, neuron_features


class _DownInputMask:
    """Shared wiring: a pre-hook on each selected MLP's output projection, entered as a context manager."""

    def __init__(self, model: nn.Module, fraction: float, dense_layers: set[int] | None = None):
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        skip = dense_layers or set()
        self.blocks = [(name, shape, block) for name, shape, block in gated_mlps(model) if layer_index(name) not in skip]
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no gated MLP to mask outside layers {sorted(skip)}")
        self.states: list = []  # per masked MLP (in ``blocks`` order) what its mask reads: k, or (grouping, k)
        self._hooks: list = []
        self._kept = 0.0
        self._tokens = 0

    def __enter__(self):
        self.states = [self._layer_state(name, mlp_width(block, shape)) for name, shape, block in self.blocks]
        for (name, shape, block), state in zip(self.blocks, self.states):
            hook = getattr(block, shape.output).register_forward_pre_hook(self._hook(state))
            self._hooks.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _hook(self, state):
        def mask_input(module: nn.Module, args: tuple):
            h = args[0]
            keep = self._mask(h, state)  # (..., n) of 0 and 1, in h's dtype
            self._kept += float(keep.sum()) / h.shape[-1]
            self._tokens += h[..., 0].numel()
            return (h * keep, *args[1:])

        return mask_input

    def kept_fraction(self) -> float | None:
        """The mean fraction of neurons kept per token and MLP so far (None before any forward)."""
        return self._kept / self._tokens if self._tokens else None

    def _layer_state(self, name: str, width: int):
        raise NotImplementedError

    def _mask(self, h: torch.Tensor, state) -> torch.Tensor:
        raise NotImplementedError


class TopKMask(_DownInputMask):
    """Per token, only the ``round(fraction * n)`` neurons of largest ``|act(gate) * up|`` reach ``down``.

    Args:
        model: a causal LM of a registered family with gated MLPs (bare, PEFT-wrapped, or LTE-routed: the hook
            masks what reaches ``down`` either way).
        fraction: of each MLP's neurons kept per token, in (0, 1].
        dense_layers: layer indices left unmasked.
    """

    def _layer_state(self, name: str, width: int) -> int:
        return max(1, round(self.fraction * width))

    def _mask(self, h: torch.Tensor, k: int) -> torch.Tensor:
        if k >= h.shape[-1]:
            return torch.ones_like(h)
        top = h.detach().abs().topk(k, dim=-1).indices
        return torch.zeros_like(h).scatter_(-1, top, 1.0)


class TopKExperts(_DownInputMask):
    """Per token, the ``round(fraction * experts)`` experts (LTE's grouping) of largest activation norm reach ``down``.

    Args:
        model: as :class:`TopKMask`.
        fraction: of each MLP's experts kept per token, in (0, 1].
        expert_size: neurons per expert; must divide every masked MLP's width.
        kmeans_iterations, seed: the grouping's, as ``LTEConfig`` sets them (the same values group as ``apply_lte``).
        dense_layers: layer indices left unmasked.
        features: per MLP name, the (n, d) rows the neurons are grouped by instead of their gate and up rows (e.g.
            :func:`~sat_trainer.lte.experts.coactivation_features`); None: LTE's grouping.
    """

    def __init__(
        self,
        model: nn.Module,
        fraction: float,
        expert_size: int,
        kmeans_iterations: int = 20,
        seed: int = 0,
        dense_layers: set[int] | None = None,
        features: Mapping[str, torch.Tensor] | None = None,
    ):
        self.expert_size, self.kmeans_iterations, self.seed = expert_size, kmeans_iterations, seed
        self.features = features
        super().__init__(model, fraction, dense_layers)
        self._by_name = {name: (shape, block) for name, shape, block in self.blocks}

    def _layer_state(self, name: str, width: int) -> tuple[torch.Tensor, int]:
        if width % self.expert_size:
            raise ValueError(f"expert_size {self.expert_size} does not divide {name}'s {width} neurons")
        shape, block = self._by_name[name]
        features = neuron_features(block, shape) if self.features is None else self.features[name]
        groups = group_neurons(features, self.expert_size, self.kmeans_iterations, self.seed + layer_index(name))
        return groups.expert_of, max(1, round(self.fraction * groups.num_experts))

    def _mask(self, h: torch.Tensor, state: tuple[torch.Tensor, int]) -> torch.Tensor:
        expert_of, k = state
        expert_of = expert_of.to(h.device)
        experts = int(expert_of.max()) + 1
        if k >= experts:
            return torch.ones_like(h)
        norms = expert_energy(h, expert_of, experts)
        top = norms.topk(k, dim=-1).indices
        chosen = torch.zeros_like(norms).scatter_(-1, top, 1.0)
        return chosen.index_select(-1, expert_of).to(h.dtype)


class RandomExperts(_DownInputMask):
    """Per token, ``round(fraction * experts)`` random experts of ``expert_size`` random neurons reach ``down``.

    Args:
        model: as :class:`TopKMask`.
        fraction: of each MLP's experts kept per token, in (0, 1].
        expert_size: neurons per expert; must divide every masked MLP's width.
        seed: seed of the groupings and of the draws (the same seed draws the same experts for the same calls).
        dense_layers: layer indices left unmasked.
    """

    def __init__(self, model: nn.Module, fraction: float, expert_size: int, seed: int = 0, dense_layers: set[int] | None = None):
        self.expert_size = expert_size
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(model, fraction, dense_layers)

    def _layer_state(self, name: str, width: int) -> tuple[torch.Tensor, int]:
        if width % self.expert_size:
            raise ValueError(f"expert_size {self.expert_size} does not divide {name}'s {width} neurons")
        experts = width // self.expert_size
        expert_of = torch.randperm(width, generator=self.generator) % experts  # a random grouping, equal sizes
        return expert_of, max(1, round(self.fraction * experts))

    def _mask(self, h: torch.Tensor, state: tuple[torch.Tensor, int]) -> torch.Tensor:
        expert_of, k = state
        experts = int(expert_of.max()) + 1
        draws = torch.rand(h[..., 0].numel(), experts, generator=self.generator)
        chosen = torch.zeros_like(draws).scatter_(-1, draws.argsort(dim=-1)[:, :k], 1.0)
        return chosen[:, expert_of].view(h.shape).to(device=h.device, dtype=h.dtype)
