"""Choosing which units to keep from their scores, reproducibly.

Randomness comes only from a ``torch.Generator`` on the weights' device, seeded by
:func:`draw_seed` from (config seed, draw number, unit index). Every rank of a distributed run
therefore draws the same noise without communicating, a resumed run redraws exactly what it
would have drawn, and no random numbers cross between host and device during a training step
(a host round trip stalls a GPU's launch queue). CPU and CUDA generators give different streams
for the same seed: draws agree between ranks and runs on the same kind of device.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 63) - 1


def draw_seed(seed: int, draw: int, unit: int) -> int:
    """Mix three integers into one generator seed (splitmix64 finaliser): nearby inputs decorrelate."""
    z = (seed * 0x9E3779B97F4A7C15 + draw * 0xBF58476D1CE4E5B9 + unit * 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK64


def generator_for(seed: int, draw: int, unit: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(draw_seed(seed, draw, unit))


def topk(scores: torch.Tensor, k: int, groups: int = 1) -> torch.Tensor:
    """The k highest-scoring units, ascending indices (sorted for memory-friendly gathers).

    With ``groups > 1`` the units form that many equal contiguous groups and k/groups are kept
    in each (query heads of one KV group: attention needs the same count per group)."""
    per_group = scores.reshape(groups, -1)
    picked = torch.topk(per_group, k // groups, dim=1, sorted=False).indices
    offsets = torch.arange(groups, device=scores.device).unsqueeze(1) * per_group.shape[1]
    return (picked + offsets).reshape(-1).sort().values


def sampling(scores: torch.Tensor, k: int, temperature: float, generator: torch.Generator, groups: int = 1) -> torch.Tensor:
    """k draws without replacement with p ~ score^(1/temperature), via the Gumbel-top-k trick.

    Adding Gumbel noise to log-probabilities and taking the top k is an exact sample without
    replacement, in one vectorised op. Zero scores are clamped to a tiny positive value so every
    unit keeps a (small) chance to train.
    """
    logits = scores.float().clamp_min(1e-30).log() / temperature
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp_(1e-20, 1.0 - 1e-7)
    return topk(logits - (-uniform.log()).log(), k, groups)
