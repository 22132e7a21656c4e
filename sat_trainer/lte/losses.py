"""LTE's stage-1 loss terms over the router scores of one forward.

With ``G_l(x)_i`` the score of expert i of routed MLP l for token x (N_l experts, L routed MLPs, T tokens):

* efficiency: ``1/L sum_l mean_{x, i} G_l(x)_i``: lower scores, fewer experts over the threshold;
* separability: ``1/L sum_l mean_{x, i} 1 / (G_l(x)_i - tau)^2``: scores pushed away from the threshold tau, so
  that stage 2's hard choice (score > tau) changes the network less.

The paper writes both as averages over layers and experts (``1/(L N) sum_l sum_i``); averaging per MLP first lets
MLPs with different expert counts weigh the same, and equals the paper's form when every MLP has N experts. Not yet
checked against the paper's PDF: whether its efficiency term squares the scores (a secondary summary renders it as
``G_l(x)_i^2``) and the exact separability form; until then these are this package's reading. The
separability term is unbounded at the threshold: a score closer than ``SEPARABILITY_FLOOR`` counts as that far
(value and gradient capped), so one score that lands on tau cannot make the loss infinite. Every token of the
forward counts, padding included. Computed in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SEPARABILITY_FLOOR = 1e-2


def efficiency_loss(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean router score, per MLP then over MLPs.

    Args:
        scores: one (..., N_l) tensor of scores in (0, 1) per routed MLP.

    Returns:
        a float32 scalar.
    """
    return torch.stack([s.float().mean() for s in scores]).mean()


def separability_loss(scores: Sequence[torch.Tensor], threshold: float, floor: float = SEPARABILITY_FLOOR) -> torch.Tensor:
    """Mean of ``1 / (score - threshold)^2``, per MLP then over MLPs, each distance at least ``floor``.

    Args:
        scores: one (..., N_l) tensor of scores per routed MLP.
        threshold: tau, in (0, 1).
        floor: the smallest distance to tau that counts.

    Returns:
        a float32 scalar (at least ``1 / max(tau, 1 - tau)^2`` for scores in (0, 1)).
    """
    return torch.stack([(s.float() - threshold).abs().clamp_min(floor).pow(-2).mean() for s in scores]).mean()


def stage1_loss(scores: Sequence[torch.Tensor], threshold: float, efficiency_weight: float, separability_weight: float):
    """``efficiency_weight * efficiency + separability_weight * separability`` and both terms (detached), or Nones
    when there are no scores."""
    if not scores:
        return None, None, None
    efficiency = efficiency_loss(scores)
    separability = separability_loss(scores, threshold)
    return efficiency_weight * efficiency + separability_weight * separability, efficiency.detach(), separability.detach()
