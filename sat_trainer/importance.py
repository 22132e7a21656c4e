"""Importance scores of the selectable units of one block: one small pure function per metric.

A *unit* is what SAT keeps or omits together: one MLP intermediate channel, or one attention KV
group (a KV head with all the query heads that read it, so GQA stays consistent; in plain
multi-head attention a group is one head). Every projection of a block lays its units out as
``n`` equal contiguous chunks: for an input projection, chunks of its output rows (a channel is
one row of gate/up; a group is ``G * head_dim`` rows of q and ``head_dim`` rows of k and v); for
the output projection, chunks of its input columns. The metrics only need that layout, so MLPs
and attention share them.

Definitions (x: the block's input, all tokens of the micro-batch that draws; W: out-major weights):

* ``uniform``: i.i.d. uniform random scores, so any selection keeps a uniformly random subset.
* ``magnitude``: L2 norm of all of a unit's weights (its rows of every input projection and its
  columns of the output projection).
* ``wanda``: ``sum_rows sum_k |W[row, k]| * ||x[:, k]||_2`` over the unit's rows of every input
  projection (Sun et al.'s Wanda score, aggregated per unit). O(tokens * d + d * d_out).
* ``maxip``: the maximum over a random subsample of ``maxip_tokens`` tokens of the L2 norm of the
  unit's chunk of the *first* input projection's output (|x_t . w_j| for a gate channel; the
  norm of the group's query vectors for heads). Only a subsample: scoring every token would cost
  a dense matmul of the first projection and eat the saving.

All scores are computed without autograd in float32 and are >= 0.
"""

from __future__ import annotations

import torch


def uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator).to(device)


def magnitude(in_weights: list[torch.Tensor], out_weight: torch.Tensor, n: int) -> torch.Tensor:
    total = sum(_chunk_sum(w.float().pow(2).sum(1), n) for w in in_weights)
    return (total + _chunk_sum(out_weight.float().pow(2).sum(0), n)).sqrt()


def wanda(x: torch.Tensor, in_weights: list[torch.Tensor], n: int) -> torch.Tensor:
    x_norm = x.reshape(-1, x.shape[-1]).float().norm(dim=0)
    return sum(_chunk_sum(w.float().abs() @ x_norm, n) for w in in_weights)


def maxip(
    x: torch.Tensor, first_in_weight: torch.Tensor, n: int, tokens: int, generator: torch.Generator
) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] > tokens:
        rows = torch.randperm(flat.shape[0], generator=generator)[:tokens].to(flat.device)
        flat = flat.index_select(0, rows)
    products = flat.float() @ first_in_weight.float().t()
    return products.reshape(flat.shape[0], n, -1).norm(dim=2).amax(dim=0)


def _chunk_sum(per_feature: torch.Tensor, n: int) -> torch.Tensor:
    """Sum a per-feature vector over each unit's contiguous chunk of features."""
    return per_feature.reshape(n, -1).sum(1)
