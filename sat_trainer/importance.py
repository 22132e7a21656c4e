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
  a convex mix of its values, so this bounds what the group can write). Unlike the weight-and-input
  scores (magnitude, wanda), it measures the channel's actual output (docs/journal/ compares them on
  a pretrained LLM). Where the channel outputs come from is the caller's choice
  (:class:`sat_trainer.patch.scoring.BlockScorer`): a random token
  subsample (:func:`subsample_size`) pushed through gate/up, or the outputs the training forward
  computed anyway (``activation_scores: training_forward``), which costs no matmul.

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


def subsample_tokens(
    x: torch.Tensor,
    tokens: int,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``tokens`` rows drawn from x's flattened tokens (:func:`sample_rows`) and their
    :func:`sample_weights` (None: every row was taken, each counts once)."""
    flat = x.reshape(-1, x.shape[-1])
    rows, weights = stratified_sample(flat.shape[0], tokens, generator, mask, starts, flat.device)
    return (flat if rows is None else flat.index_select(0, rows)), weights


def stratified_sample(
    total: int,
    tokens: int,
    generator: torch.Generator,
    mask: torch.Tensor | None,
    starts: torch.Tensor | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(:func:`sample_rows`, their :func:`sample_weights`), or (None, ``mask``) when every row is
    taken: then each real row counts once and padding not at all."""
    rows = sample_rows(total, tokens, generator, mask, device, starts)
    if rows is None:
        return None, mask
    return rows, sample_weights(rows, total, mask, starts, device)


def sample_rows(
    total: int,
    tokens: int,
    generator: torch.Generator,
    mask: torch.Tensor | None,
    device: torch.device,
    starts: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Indices of ``tokens`` of ``total`` flattened token rows, drawn without replacement (None: all,
    when there are no more than ``tokens``): the top ``tokens`` of uniform noise plus the padding
    ``mask`` (1 real, 0 pad) plus twice ``starts`` (1 at each sequence's first real token,
    :func:`sequence_starts`), so sequence starts come first, then real tokens, and no shape
    depends on the data (no host sync).

    Why the starts: pretrained LLMs put *massive activations* on a few MLP channels at the first
    token of every sequence (the attention sink) and ~0 elsewhere; such a channel can carry a large
    share of the model's gradient, and zeroing it raises the dense loss sharply. A uniform subsample
    of a few sequences' tokens often misses every start, and the channel is then omitted (docs/journal/
    has the record). Always sampling the starts, weighted as their own stratum (:func:`sample_weights`),
    keeps them."""
    if total <= tokens:
        return None
    if mask is None and starts is None:
        return torch.randperm(total, generator=generator, device=device)[:tokens]
    priority = torch.rand(total, generator=generator, device=device)
    if mask is not None:
        priority = priority + mask.float()
    if starts is not None:
        priority = priority + 2 * starts.float()
    return torch.topk(priority, tokens, sorted=False).indices


def other_rows(rows: torch.Tensor, total: int) -> torch.Tensor:
    """The ``total - len(rows)`` rows :func:`sample_rows` did not draw, ascending, without a host
    sync (a stable sort of the drawn flags: no shape depends on the data)."""
    drawn = torch.zeros(total, dtype=torch.int8, device=rows.device).index_fill_(0, rows, 1)
    return torch.argsort(drawn, stable=True)[: total - rows.numel()]


def sample_weights(
    rows: torch.Tensor,
    total: int,
    mask: torch.Tensor | None,
    starts: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Per sampled row, how many of the micro-batch's real tokens it stands for (0 on padding),
    float32, on the device: a stratified sample's weights, the sequence starts one stratum and the
    other real tokens the other, so a weighted mean over the sample estimates the mean over
    every real token without bias (the starts are no longer under-represented, nor over-).
    The weights sum to the number of real tokens, or to those of the strata that were sampled."""
    real = torch.ones(total, device=device) if mask is None else mask.float()
    first = torch.zeros(total, device=device) if starts is None else starts.float() * real
    rest = real - first
    taken_first, taken_rest = first.index_select(0, rows), rest.index_select(0, rows)
    return taken_first * (first.sum() / taken_first.sum().clamp_min(1)) + taken_rest * (
        rest.sum() / taken_rest.sum().clamp_min(1)
    )


def sequence_starts(
    batch: int, length: int, mask: torch.Tensor | None, position_ids: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """1 at the first real token of each sequence of a ``batch x length`` micro-batch, else 0
    (flattened, float32, on the device, no host sync). Packed sequences (``position_ids`` that
    restart at 0 inside a row) start wherever a position is 0; otherwise each row's first real
    token under the padding ``mask`` (left or right padding), or its first token."""
    if position_ids is not None and position_ids.numel() == batch * length:
        starts = position_ids.reshape(-1).to(device).eq(0).float()
        return starts if mask is None else starts * mask.float()
    if mask is None:
        starts = torch.zeros(batch, length, device=device)
        starts[:, 0] = 1
        return starts.reshape(-1)
    rows = mask.reshape(batch, length).float()
    first = F.one_hot(rows.argmax(1), length).float()  # argmax returns the first maximum: the first real token
    return (first * rows).reshape(-1)  # an all-padding row starts nowhere


def maxip(
    x: torch.Tensor,
    first_in_weight: torch.Tensor,
    n: int,
    tokens: int,
    generator: torch.Generator,
    mask: torch.Tensor | None = None,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    flat, _ = subsample_tokens(x, tokens, generator, mask, starts)
    products = F.linear(flat, first_in_weight)  # in the weights' dtype: no float copy of the weight
    return _norm32(products.reshape(flat.shape[0], n, -1), 2).amax(dim=0)


def mlp_hidden(
    tokens: torch.Tensor,
    in_weights: list[torch.Tensor],
    in_biases: list[torch.Tensor | None],
    act: Callable[[torch.Tensor], torch.Tensor],
    keep: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The MLP channels' outputs on ``tokens`` (the down projection's input): ``act(t W_0 + b_0) * (t W_1 + b_1)``,
    the second factor only for gated MLPs. ``in_weights`` are out-major; the products run in the
    weights' dtype (no float copy of any weight). The ``activation`` score of an MLP channel is
    :func:`channel_rms` of these times :func:`output_column_norms`. ``keep``: a list that gets the
    input projections' outputs (``t W_i + b_i``), for the forward to reuse on these tokens."""
    outputs = [F.linear(tokens, w, b) for w, b in zip(in_weights, in_biases)]
    if keep is not None:
        keep.extend(outputs)
    hidden = act(outputs[0])
    if len(outputs) > 1:
        hidden = hidden * outputs[1]
    return hidden


def real_token_mean(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden``'s rows, row i counted ``weights[i]`` times (0/1 for real tokens and
    padding, or :func:`sample_weights`; None: every row once), in float32, without a host sync
    (the total weight stays on the device)."""
    if weights is None:
        return hidden.float().mean(0)
    return (weights.to(hidden.dtype) @ hidden).float() / weights.float().sum().clamp_min(1e-12)


def channel_rms(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each channel's root-mean-square output over the rows of ``hidden`` (tokens x channels),
    row i counted ``weights[i]`` times (0 on padding; :func:`sample_weights` on a subsample;
    None: every row once), float32.

    The root *mean* square, not the norm, so that measurements over different numbers of tokens
    compare: ``activation_scores: training_forward`` mixes the sparse forward's own measurement of the
    kept channels with re-measurements of the others on the scoring subsample, and a dense
    forward's measurement over all tokens with a subsample's."""
    if weights is None:
        return _norm32(hidden, 0) / math.sqrt(max(hidden.shape[0], 1))
    w = weights.float()
    return _norm32(hidden * w.sqrt().to(hidden.dtype).unsqueeze(1), 0) / w.sum().clamp_min(1e-12).sqrt()


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
    tokens: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor | None,
    out_weight: torch.Tensor,
    groups: int,
    per_head: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per KV group (or, with ``per_head``, per query head): the norm over ``tokens`` (and the
    group's query heads) of ``W_o[:, head] v_t``, token t's square counted ``weights[t]`` times
    (:func:`sample_weights`; None: once): :func:`value_scores` of the values ``v_weight`` (v_proj's
    out-major weight, ``groups * head_dim`` rows) gives these tokens."""
    return value_scores(F.linear(tokens, v_weight, v_bias), out_weight, groups, per_head, weights)


def value_scores(
    values: torch.Tensor,
    out_weight: torch.Tensor,
    groups: int,
    per_head: bool = False,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`activation_attention` from the value vectors themselves (``tokens x groups * head_dim``):
    a subsample's, or a dense forward's own v_proj output on every token.

    ``out_weight`` is o_proj's (``hidden x groups * heads_per_group * head_dim``); query head h reads
    KV group h // heads_per_group, as transformers' ``repeat_kv`` lays them out. Summed over tokens,
    ``||W_o[:, head] v_t||^2 = v_t^T G v_t`` with ``G = W_o[:, head]^T W_o[:, head]`` is ``<G, M>`` with
    ``M = sum_t v_t v_t^T``: one head_dim x head_dim Gram matrix per head and one second moment per
    KV group, instead of a product per token and head."""
    head_dim = values.shape[-1] // groups
    values = values.reshape(-1, groups, head_dim).float()
    if weights is not None:
        values = values * weights.float().sqrt().reshape(-1, 1, 1)
    out = out_weight.reshape(out_weight.shape[0], groups, -1, head_dim)  # (hidden, group, head in group, head_dim)
    gram = torch.einsum("dgqh,dgqk->gqhk", out, out).float()
    moments = torch.einsum("tgh,tgk->ghk", values, values)
    squares = (gram * moments.unsqueeze(1)).sum((-2, -1)).clamp_min(0)
    return (squares.reshape(-1) if per_head else squares.sum(1)).sqrt()


def _norm32(t: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm along ``dim`` as float32.

    Along the last (contiguous) dim, ``vector_norm``. Along any other, the sum of squares: on the CPU
    ``vector_norm`` reduces a strided dim more slowly (the RMS of every channel over the tokens, which
    ``omit_in: backward`` reads from each sparse block's forward, is this reduction). The squares are
    taken in ``t``'s dtype and summed in float32, which is also more accurate than ``vector_norm`` in bf16."""
    if dim in (-1, t.dim() - 1):
        return torch.linalg.vector_norm(t, dim=dim).float()
    return (t * t).sum(dim, dtype=torch.float32).sqrt()


def _chunk_sum(per_feature: torch.Tensor, n: int) -> torch.Tensor:
    """Sum a per-feature vector over each unit's contiguous chunk of features."""
    return per_feature.reshape(n, -1).sum(1)
