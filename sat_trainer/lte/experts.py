"""Expert grouping: a gated MLP's neurons into equal-size experts by balanced k-means over their input weights.

Neuron j of a gated MLP is row j of gate and of up (and column j of down); its feature vector is its gate row and
its up row side by side. LTE groups neurons whose input weights are alike into the same expert (the paper found
random grouping worse). *Balanced*: every expert gets exactly ``size`` neurons, so experts are equal work units.

The result is a permutation ``order`` of the neurons: expert ``e`` owns ``order[e * size:(e + 1) * size]``, and
``expert_of[j]`` is neuron ``j``'s expert. The weights themselves are never moved; a reader that wants each
expert's rows contiguous (a sparse-inference kernel) can lay them out once from ``order``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertGroups:
    """Which expert each neuron of one MLP belongs to."""

    order: torch.Tensor  # (n,) int64: the neurons expert by expert, each expert's in ascending index order
    size: int  # neurons per expert

    @property
    def num_experts(self) -> int:
        return self.order.numel() // self.size

    @property
    def expert_of(self) -> torch.Tensor:
        """(n,) int64: the expert of each neuron."""
        experts = torch.arange(self.num_experts, device=self.order.device).repeat_interleave(self.size)
        return torch.empty_like(self.order).scatter_(0, self.order, experts)

    @classmethod
    def from_assignment(cls, assignment: torch.Tensor, size: int) -> ExpertGroups:
        """From each neuron's expert (every expert exactly ``size`` neurons)."""
        return cls(torch.argsort(assignment, stable=True), size)


def balanced_kmeans(features: torch.Tensor, size: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster the rows of ``features`` into groups of exactly ``size`` rows.

    Lloyd's iterations with a balanced assignment step (:func:`balanced_assign`): centroids start at ``n / size``
    distinct rows drawn with ``seed``, and stop early when an assignment repeats. Deterministic for a given seed
    and device.

    Args:
        features: (n, d) one row per neuron; ``size`` must divide n.
        size: rows per cluster.
        iterations: at most this many assign-and-update rounds.
        seed: seed of the initial centroids.

    Returns:
        (n,) int64: each row's cluster, every cluster holding ``size`` rows.
    """
    n = features.shape[0]
    if size < 1 or n % size:
        raise ValueError(f"cluster size {size} does not divide {n} rows")
    k = n // size
    x = features.detach().float()
    start = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].to(x.device)
    centroids = x[start]
    assignment = None
    for _ in range(max(iterations, 1)):
        new = balanced_assign(torch.cdist(x, centroids), size)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = torch.zeros_like(centroids).index_add_(0, assignment, x) / size
    return assignment


def balanced_assign(distance: torch.Tensor, size: int) -> torch.Tensor:
    """Assign each of n rows to one of k columns, ``size`` rows per column (n = k * size), nearest first.

    Rounds of proposals: every unassigned row proposes to its nearest column that still has room; each column
    accepts its nearest proposers up to its room. Every round assigns at least one row (the rooms left always
    equal the rows left), so at most n rounds run; in practice a few. Ties go to the lower index.

    Args:
        distance: (n, k) row-to-column distances.
        size: rows per column.

    Returns:
        (n,) int64 column of each row.
    """
    n, k = distance.shape
    if n != k * size:
        raise ValueError(f"{n} rows do not fill {k} columns of {size}")
    assignment = torch.full((n,), -1, dtype=torch.long, device=distance.device)
    room = torch.full((k,), size, dtype=torch.long, device=distance.device)
    while True:
        free = (assignment < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assignment
        d = distance[free].masked_fill(room == 0, float("inf"))
        choice = d.argmin(dim=1)
        cost = d.gather(1, choice.unsqueeze(1)).squeeze(1)
        by_cost = torch.argsort(cost, stable=True)
        by_choice = by_cost[torch.argsort(choice[by_cost], stable=True)]  # grouped by column, nearest first
        column = choice[by_choice]
        counts = torch.bincount(column, minlength=k)
        rank = torch.arange(column.numel(), device=column.device) - (torch.cumsum(counts, 0) - counts)[column]
        accept = rank < room[column]
        assignment[free[by_choice[accept]]] = column[accept]
        room -= torch.bincount(column[accept], minlength=k)


def group_neurons(features: torch.Tensor, size: int, iterations: int = 20, seed: int = 0) -> ExpertGroups:
    """:func:`balanced_kmeans` of one MLP's neuron features, as :class:`ExpertGroups`."""
    return ExpertGroups.from_assignment(balanced_kmeans(features, size, iterations, seed), size)


def expert_energy(h: torch.Tensor, expert_of: torch.Tensor, experts: int) -> torch.Tensor:
    """(..., experts): per token, the sum of squares of each expert's activations in ``h`` (..., n), in float32.

    What the oracle baseline ranks experts by and what ``router_init: activations`` fits the routers to."""
    energy = torch.zeros(*h.shape[:-1], experts, device=h.device)
    return energy.index_add_(-1, expert_of.to(h.device), h.detach().float().pow(2))


def coactivation_features(h: torch.Tensor) -> torch.Tensor:
    """(n, tokens): each neuron's ``|h_j|`` over calibration tokens ``h`` (tokens, n), scaled to unit norm, so that
    :func:`balanced_kmeans` of these rows groups neurons that are large on the same tokens (whatever their scale).

    An alternative to grouping by weight rows, measured in docs/journal/lte_2026-12-07.md: an expert's neurons are
    then the ones a token needs together, which is what a router choosing whole experts can exploit."""
    profile = h.detach().float().abs().T
    return profile / profile.norm(dim=1, keepdim=True).clamp_min(1e-12)
