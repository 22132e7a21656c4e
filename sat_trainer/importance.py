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
* ``activation``: what the unit actually adds to the block's output: for an MLP channel j, the
  root mean square over tokens of ``act(x W_gate[j]) * (x W_up[j])`` (plain MLPs:
  ``act(x W_fc[j] + b_j)``) times the norm of the output projection's column j, i.e. the size of
  the channel's term in the down projection. For an attention KV group, the norm over a token
  subsample and the group's query heads of each value vector pushed through the head's columns
  of ``o_proj`` (``||W_o[:, head] v_t||``): the attention weights are ignored (each head outputs
  a convex mix of its values, so this bounds what the group can write). On a real pretrained LLM
  the weight-and-input scores (magnitude, wanda) rank channels no better than chance while this
  one tracks the channel's true contribution (docs/benchmarks.md). Where the channel outputs come
  from is the caller's choice (:class:`sat_trainer.patch.units.BlockUnit`): a random token
  subsample (:func:`subsample_size`) pushed through gate/up, or the outputs the training forward
  computed anyway (``activation_scores: forward``), which costs no matmul.

All scores are computed without autograd, returned in float32, and are >= 0. They read the
weights in their own dtype (bf16 on a GPU) with float32 accumulation, never through a float32
copy of a weight, and draw random numbers from a generator on the weights' device: scoring
makes no host round trip.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def uniform(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device)


def magnitude(in_weights: list[torch.Tensor], out_weight: torch.Tensor, n: int) -> torch.Tensor:
    total = sum(_chunk_sum(_norm32(w, 1).square(), n) for w in in_weights)
    return (total + _chunk_sum(_norm32(out_weight, 0).square(), n)).sqrt()


def wanda(x: torch.Tensor, in_weights: list[torch.Tensor], n: int) -> torch.Tensor:
    x_norm = _norm32(x.reshape(-1, x.shape[-1]), 0)
    # |W| in the weights' own dtype (a float copy of every weight cost 3x the memory traffic on a
    # GPU); the matrix-vector product accumulates in float32 on CUDA and CPU alike
    return sum(_chunk_sum((w.abs() @ x_norm.to(w.dtype)).float(), n) for w in in_weights)


def subsample_tokens(x: torch.Tensor, tokens: int, generator: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``tokens`` rows drawn without replacement from x's flattened tokens (all if fewer); see :func:`sample_rows`."""
    flat = x.reshape(-1, x.shape[-1])
    rows = sample_rows(flat.shape[0], tokens, generator, mask, flat.device)
    return flat if rows is None else flat.index_select(0, rows)


def sample_rows(total: int, tokens: int, generator: torch.Generator, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Indices of ``tokens`` of ``total`` flattened token rows, drawn without replacement (None: all,
    when there are no more than ``tokens``). With a padding ``mask`` (1 real, 0 pad; flattened),
    real tokens are drawn first: the top ``tokens`` of uniform noise plus the mask, so no
    data-dependent shape and no host sync."""
    if total <= tokens:
        return None
    if mask is None:
        return torch.randperm(total, generator=generator, device=device)[:tokens]
    noise = torch.rand(total, generator=generator, device=device)
    return torch.topk(noise + mask.float(), tokens, sorted=False).indices


def maxip(
    x: torch.Tensor, first_in_weight: torch.Tensor, n: int, tokens: int, generator: torch.Generator,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    flat = subsample_tokens(x, tokens, generator, mask)
    products = F.linear(flat, first_in_weight)  # in the weights' dtype: no float copy of the weight
    return _norm32(products.reshape(flat.shape[0], n, -1), 2).amax(dim=0)


def mlp_hidden(
    tokens: torch.Tensor, in_weights: list[torch.Tensor], in_biases: list[torch.Tensor | None], act: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The MLP channels' outputs on ``tokens`` (the down projection's input): ``act(t W_0 + b_0) * (t W_1 + b_1)``,
    the second factor only for gated MLPs. ``in_weights`` are out-major; the products run in the
    weights' dtype (no float copy of any weight). The ``activation`` score of an MLP channel is
    :func:`channel_rms` of these times :func:`output_column_norms`."""
    hidden = act(F.linear(tokens, in_weights[0], in_biases[0]))
    if len(in_weights) > 1:
        hidden = hidden * F.linear(tokens, in_weights[1], in_biases[1])
    return hidden


def nonzero_rows(tokens: torch.Tensor) -> torch.Tensor:
    """1 for each row of ``tokens`` (tokens x features) that is not all zero, else 0, in its dtype:
    the real tokens of a subsample whose padding rows were zeroed."""
    return tokens.ne(0).any(dim=1).to(tokens.dtype)


def real_token_mean(hidden: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden``'s rows over the ``real`` ones (0/1 per row; None: all rows), in
    float32, without a host sync (the count stays on the device)."""
    if real is None:
        return hidden.float().mean(0)
    return (real.to(hidden.dtype) @ hidden).float() / real.sum().clamp_min(1).float()


def channel_rms(hidden: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Each channel's root-mean-square output over the ``real`` rows of ``hidden`` (tokens x
    channels, padding rows zeroed; None: every row is real), float32.

    The root *mean* square, not the norm, so that measurements over different numbers of tokens
    compare: ``activation_scores: forward`` mixes the sparse forward's own measurement of the
    kept channels (all of the micro-batch's tokens) with re-measurements of the others on the
    scoring subsample."""
    norms = _norm32(hidden, 0)
    if real is None:
        return norms / math.sqrt(max(hidden.shape[0], 1))
    return norms / real.sum().clamp_min(1).float().sqrt()


def output_column_norms(out_weight: torch.Tensor) -> torch.Tensor:
    """``||W_out[:, j]||`` for each input feature j of the output projection (out-major weight):
    the second factor of the ``activation`` score."""
    return _norm32(out_weight, 0)


def subsample_size(tokens: int, floor: int, fraction: float) -> int:
    """Tokens to subsample for scoring out of ``tokens``: ``fraction`` of them, at least ``floor``,
    at most all. A fraction keeps scoring's share of the step's work the same at every batch size;
    the floor keeps a small micro-batch's estimate from resting on a handful of tokens."""
    return min(tokens, max(floor, math.ceil(fraction * tokens)))


def activation_attention(
    tokens: torch.Tensor, v_weight: torch.Tensor, v_bias: torch.Tensor | None, out_weight: torch.Tensor, groups: int,
    per_head: bool = False,
) -> torch.Tensor:
    """Per KV group (or, with ``per_head``, per query head): the norm over ``tokens`` (and the
    group's query heads) of ``W_o[:, head] v_t``.

    ``v_weight`` is v_proj's out-major weight (``groups * head_dim`` rows), ``out_weight`` o_proj's
    (``hidden x groups * heads_per_group * head_dim``); query head h reads KV group h // heads_per_group,
    as transformers' ``repeat_kv`` lays them out."""
    values = F.linear(tokens, v_weight, v_bias)
    head_dim = values.shape[-1] // groups
    values = values.reshape(tokens.shape[0], groups, head_dim).float()
    out = out_weight.reshape(out_weight.shape[0], groups, -1, head_dim)  # (hidden, group, head in group, head_dim)
    # ||W_o[:, head] v||^2 = v^T (W_o[:, head]^T W_o[:, head]) v: one head_dim x head_dim Gram matrix per
    # head instead of pushing every token's values through hidden-sized columns (4x fewer FLOPs at 256 tokens)
    gram = torch.einsum("dgqh,dgqk->gqhk", out, out).float()
    squares = torch.einsum("tgh,gqhk,tgk->gq", values, gram, values).clamp_min(0)
    return (squares.reshape(-1) if per_head else squares.sum(1)).sqrt()


def _norm32(t: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm along ``dim`` as float32. Reductions of bf16/fp16 already accumulate in float32;
    passing ``dtype=float32`` instead would first copy the whole tensor to float32 (measured on
    CPU, bf16 4096 x 8192: 103 ms with the copy, 4 ms without)."""
    return torch.linalg.vector_norm(t, dim=dim).float()


def _chunk_sum(per_feature: torch.Tensor, n: int) -> torch.Tensor:
    """Sum a per-feature vector over each unit's contiguous chunk of features."""
    return per_feature.reshape(n, -1).sum(1)
