"""One block's importance scores: the metric applied to what the block sees, and what scores carry between draws.

Metric ``activation`` on MLP blocks keeps statistics between draws: each channel's output RMS
and its down column's norm (the score is their product), and with ``compensation: mean`` each
channel's mean output. With ``activation_scores: training_forward`` the training forward refreshes the
channels it computes (:meth:`BlockScorer.observe`: the kept ones, or all of them when the forward
is dense) and each draw re-measures a rotating window of the channels on a token subsample.
When the forward is dense too (``omit_in: backward``/``weight_gradient``), the block *draws in
its forward*: the kept set only matters in backward, so it is drawn from this forward's outputs
of every channel (MLP, at the output projection) or every head's values (attention, at the
value projection), not from the previous forward's. When each draw scores every channel on a
subsample of the micro-batch it is drawn for (the default under ``forward_backward``), the
subsample's full-width gate/up outputs are kept for that micro-batch's sliced forward, which
then computes only the other token rows (:meth:`BlockScorer.given_rows`).

The statistics, the cached scores (``score_every``) and their counters travel in checkpoints
(:meth:`BlockScorer.state`), so a resumed run draws what the uninterrupted one would.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import importance
from ..errors import SATError
from ..ops import GivenRows, out_major_weight
from .forward_context import ForwardContext
from .layout import BlockLayout, Part
from .registry import BlockShape

# checkpoint key -> BlockScorer attribute (the keys are those of checkpoints already written)
_STATE_TENSORS = {"_rms": "rms", "_out_norms": "out_norms", "_mean_hidden": "mean_hidden", "_scores_cache": "cached_scores"}


class BlockScorer:
    """Scores one block's units for its draws (see the module docstring).

    Flags, fixed by the config: ``observes`` (the training forward refreshes the MLP statistics),
    ``draws_in_forward`` (the kept set is drawn from this forward's activations), ``reuses_sample``
    (the scoring subsample's outputs go to the sliced forward), ``compensates`` (mean compensation).
    """

    def __init__(self, shape: BlockShape, block: nn.Module, context: ForwardContext, query_heads: bool, backward_only: bool):
        cfg = context.config
        self.kind, self.shape, self.block, self.context = shape.kind, shape, block, context
        self.query_heads, self.backward_only = query_heads, backward_only
        from_forward = cfg.metric == "activation" and cfg.scores_from_forward()
        self.stores_statistics = shape.kind == "mlp" and cfg.metric == "activation"
        self.observes = shape.kind == "mlp" and from_forward
        scores_values = shape.kind == "attention" and from_forward and not query_heads
        self.draws_in_forward = backward_only and (self.observes or scores_values)
        self.reuses_sample = self.stores_statistics and not self.observes and not backward_only and cfg.sparse_tokens == "all"
        self.compensates = shape.kind == "mlp" and cfg.compensation == "mean"
        self.layout: BlockLayout | None = None
        self.values: tuple[nn.Module, Part] | None = None  # what read_values reads: v's base layer and its rows
        self.sample_outputs: SampleOutputs | None = None
        self.rms: torch.Tensor | None = None
        self.out_norms: torch.Tensor | None = None
        self.mean_hidden: torch.Tensor | None = None
        self.cached_scores: torch.Tensor | None = None  # reused for score_every draws
        self.scored_at = 0
        self.window = 0  # the next window _activation_mlp_scores re-measures
        # the token rows (of how many, and their stratum weights) that window was measured on: observe() measures
        # the kept channels on the same rows with the same weights, since an RMS over more tokens is not comparable
        self._sample_rows: torch.Tensor | None = None
        self._sample_weights: torch.Tensor | None = None
        self._sample_of = 0

    def use_layout(self, layout: BlockLayout) -> None:
        """Score the units of ``layout`` (the block's projections, resolved again after LoRA changes)."""
        self.layout = layout
        reads_values = self.kind == "attention" and self.draws_in_forward and layout.fallback is None
        self.values = layout.logical[2] if reads_values else None

    def reset(self) -> None:
        """Forget the statistics, cached scores and kept subsample outputs (the next draw measures afresh)."""
        self.cached_scores, self.sample_outputs = None, None
        self.rms = self.out_norms = self.mean_hidden = None
        self.window = 0

    # ---- scores -----------------------------------------------------------------------------

    def scores_for_draw(self, x: torch.Tensor, draw_id: int, generator: torch.Generator | None, hidden: bool) -> torch.Tensor:
        """The scores draw ``draw_id`` selects from: fresh from ``x`` (see :meth:`scores`), or the cached
        ones while fewer than ``score_every`` draws have passed. Data-dependent scores are averaged over ranks."""
        self.sample_outputs = None  # a draw from cached scores measures nothing to reuse
        if self.cached_scores is None or draw_id - self.scored_at >= self.context.config.score_every:
            scores = self.scores(x.detach(), generator, hidden)
            # MLP activation scores are built from statistics averaged over ranks as they were stored (_store)
            self.cached_scores = scores if self.stores_statistics else self.context.sync_scores(scores)
            self.scored_at = draw_id
        return self.cached_scores

    def scores(self, x: torch.Tensor, generator: torch.Generator | None, hidden: bool = False) -> torch.Tensor:
        """Every unit's score under the config's metric, from the block's input ``x``, or (``hidden``,
        a block that draws in its forward) from the down projection's input of every channel or the
        values of every head. Metric ``activation`` on MLPs also updates the stored statistics."""
        if self.stores_statistics:
            return self._activation_mlp_scores(x, generator, hidden)
        cfg, layout = self.context.config, self.layout
        in_weights, _ = layout.sliced_logical_inputs()
        if cfg.metric == "uniform":
            return importance.uniform(layout.n, generator, x.device)
        if cfg.metric == "magnitude":
            return importance.magnitude(in_weights, out_major_weight(layout.output), layout.n)
        x, mask = self._zero_padding(x)  # and subsamples draw real tokens first
        if cfg.metric == "wanda":
            return importance.wanda(x, in_weights, layout.n)
        kv_groups = layout.groups if self.query_heads else layout.n
        if hidden:  # this dense forward's own values, every real token (read_values)
            return importance.value_scores(
                x.reshape(-1, x.shape[-1]), out_major_weight(layout.output), kv_groups, self.query_heads
            )
        starts = self.context.sequence_starts_for(x)
        if cfg.metric == "maxip":
            return importance.maxip(x, in_weights[0], layout.n, cfg.maxip_tokens, generator, mask, starts)
        tokens = x.numel() // x.shape[-1]
        size = importance.subsample_size(tokens, cfg.activation_tokens, cfg.activation_token_fraction)
        sample, weights = importance.subsample_tokens(x, size, generator, mask, starts)
        values, value_bias = layout.logical_weight(2)  # v_proj, or the v segment of a fused qkv_proj
        return importance.activation_attention(
            sample, values, value_bias, out_major_weight(layout.output), kv_groups, self.query_heads, weights
        )

    def record_scored_input(self, store: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
        """Hook that passes ``store`` (detached) what this block's draws score in training, each time the
        block runs: the block's input, or, for a block that draws in its forward, the down projection's
        input or the values (:meth:`value_rows`). :meth:`score_recorded` scores it."""
        if self.values is not None:
            return self.values[0].register_forward_hook(lambda m, a, out: store(self.value_rows(out).detach()))
        module = self.layout.output if self.draws_in_forward else self.layout.inputs[0]
        return module.register_forward_pre_hook(lambda m, a: store(a[0].detach()))

    def score_recorded(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Every unit's score from what :meth:`record_scored_input` passed, as a draw in training scores it."""
        return self.scores(x, generator, hidden=self.draws_in_forward)

    def value_rows(self, out: torch.Tensor) -> torch.Tensor:
        """The values in the value projection's base output: all of it, or a fused qkv's v features."""
        part = self.values[1]
        return out if part.size == out.shape[-1] else out[..., part.start : part.start + part.size]

    def omitted_mean_output(self, kept: torch.Tensor) -> torch.Tensor:
        """``W_out[:, omitted] @ mean_h[omitted]``: what the omitted channels add on average, as a constant."""
        out_weight = out_major_weight(self.layout.output)
        omitted = torch.ones_like(self.mean_hidden).index_fill_(0, kept, 0.0)
        return out_weight @ (self.mean_hidden * omitted).to(out_weight.dtype)  # in the weight's dtype: no float copy of it

    # ---- the MLP statistics ---------------------------------------------------------------------

    def observe(self, h: torch.Tensor, kept_units: torch.Tensor | None) -> None:
        """Refresh the RMS (and, with compensation, the mean) of the channels whose outputs ``h`` the
        training forward just computed: the down projection's input, the ``kept_units``' or, when the
        forward is dense (``omit_in: backward``), every channel's. One reduction over ``h``, no
        matmul; the next draw scores from it. A sparse forward measures its kept channels on the
        token rows the draw's window was measured on (same rows, same weights): an RMS over all of
        the micro-batch's tokens is not comparable with one over a subsample, since LLM activations
        are heavy-tailed and a subsample usually misses the rare large tokens, so the kept channels
        would look larger than the re-measured ones and stay kept. A dense forward measures every
        channel, on all tokens. Inside a compiled graph nothing is refreshed (a side effect the graph
        would not keep): the re-measured window alone keeps the scores current."""
        if torch.compiler.is_compiling() or self.rms is None:
            return
        n = self.layout.n
        with torch.no_grad():
            h, mask = self._zero_padding(h.detach())
            flat = h.reshape(-1, h.shape[-1])
            weights = None if mask is None else mask.reshape(-1)
            if self._sample_rows is not None and flat.shape[0] == self._sample_of and not self.backward_only:
                flat, weights = flat.index_select(0, self._sample_rows), self._sample_weights
            kept = None if flat.shape[1] == n and self.backward_only else kept_units
            if kept is not None and flat.shape[1] == n:  # split token rows: the sparse rows' omitted features are zeros
                flat = flat.index_select(1, kept)
            self._store(self.rms, kept, importance.channel_rms(flat, weights))
            if self.compensates:
                self._store(self.mean_hidden, kept, importance.real_token_mean(flat, weights))

    def _activation_mlp_scores(self, x: torch.Tensor, generator: torch.Generator | None, hidden: bool) -> torch.Tensor:
        """The activation scores of every channel: its output RMS times its down column's norm.

        ``hidden`` (a block that draws in its forward): ``x`` is this dense forward's down projection
        input, so every channel's RMS is read from it on all real tokens, no matmul. Otherwise ``x``
        is the block's input: the first draw (and every draw with ``activation_scores: subsample``)
        measures all channels on a token subsample; later ones, with ``forward``, measure only the
        next window of ``ceil(n / remeasure_every)`` contiguous channels (their rows of gate/up and
        columns of down are views, no gather), the training forward having refreshed the kept
        channels' RMS already (:meth:`observe`). The window also bounds how stale an omitted
        channel's score and every down column's norm can get."""
        cfg, layout, n = self.context.config, self.layout, self.layout.n
        first = self.rms is None
        window = slice(0, n) if first or not self.observes else self._next_window(cfg.remeasure_every)
        if first:
            self.rms, self.out_norms = torch.zeros(n, device=x.device), torch.zeros(n, device=x.device)
            self.mean_hidden = torch.zeros(n, device=x.device) if self.compensates else None
        self.out_norms[window] = importance.output_column_norms(out_major_weight(layout.output)[:, window])
        if hidden:
            self.observe(x, None)  # every channel's output, from a dense forward
            return self.rms * self.out_norms
        # the subsample draws sequence starts, then real tokens, first; padding rows weigh 0 in every statistic, so
        # they need no zeroing here, and the outputs on them are the forward's own (reusable)
        mask = self.context.token_mask_for(x)
        flat = x.reshape(-1, x.shape[-1])
        size = importance.subsample_size(flat.shape[0], cfg.activation_tokens, cfg.activation_token_fraction)
        rows, sample_weights = importance.stratified_sample(
            flat.shape[0], size, generator, mask, self.context.sequence_starts_for(x), flat.device
        )
        self._sample_rows, self._sample_weights, self._sample_of = rows, sample_weights, flat.shape[0]
        sample = flat if rows is None else flat.index_select(0, rows)
        weights, biases = layout.sliced_logical_inputs()
        weights, biases = [w[window] for w in weights], [None if b is None else b[window] for b in biases]
        outputs = [] if self.reuses_sample else None
        measured = importance.mlp_hidden(sample, weights, biases, _activation(self.block, self.shape.activation), outputs)
        if outputs:
            self.sample_outputs = SampleOutputs.of(x, rows, layout.outputs_by_member(outputs))
        self._store(self.rms, window, importance.channel_rms(measured, sample_weights))
        if self.compensates:
            self._store(self.mean_hidden, window, importance.real_token_mean(measured, sample_weights))
        return self.rms * self.out_norms

    def _next_window(self, remeasure_every: int) -> slice:
        n = self.layout.n
        size = -(-n // remeasure_every)
        start = self.window * size
        self.window = (self.window + 1) % -(-n // size)
        return slice(start, min(start + size, n))

    def _store(self, stats: torch.Tensor, kept: torch.Tensor | slice | None, values: torch.Tensor) -> None:
        """Write per-channel measurements into ``stats`` at the ``kept`` channels (a window slice;
        None: all), averaged over ranks first: every rank then holds the same statistics, so the
        same kept sets follow, and a checkpoint's copy (rank 0's) is every rank's."""
        values = self.context.sync_scores(values)
        if kept is None:
            stats.copy_(values)
        elif isinstance(kept, slice):
            stats[kept] = values
        else:
            stats.index_copy_(0, kept, values)

    def _zero_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` with its padding tokens' rows zeroed (they score nothing), and the padding mask."""
        mask = self.context.token_mask_for(x)
        return (x if mask is None else x * mask.reshape(*x.shape[:-1], 1)), mask

    # ---- the scoring subsample's outputs, reused by the sliced forward ---------------------------

    def given_rows(self, member: nn.Module, x: torch.Tensor) -> GivenRows | None:
        """What input projection ``member`` of a block that reuses its scoring subsample knows already
        of its output on ``x``: the subsample's rows, when ``x`` is the micro-batch the draw measured,
        each member's once; an empty :class:`GivenRows` otherwise, so that every call of the member
        goes through the same op (a checkpoint's recompute must save what its forward saved). None:
        the plain op (other blocks and members, LoRA's ``lora_B``, and under ``torch.compile``, where
        the draw's side state is not traced)."""
        if not self.reuses_sample or not any(member is base for base in self.layout.inputs) or torch.compiler.is_compiling():
            return None
        record = self.sample_outputs
        if record is None or not record.measured(x) or member not in record.outputs:
            return GivenRows()
        if record.rows is not None and record.other is None:
            record.other = importance.other_rows(record.rows, x.numel() // x.shape[-1])
        given = GivenRows(record.rows, record.other, record.outputs.pop(member))
        if not record.outputs:  # every member has its rows: nothing stays alive past this forward
            self.sample_outputs = None
        return given

    # ---- checkpoint state -----------------------------------------------------------------------

    def state(self) -> dict:
        """The scores carried between draws (forward-measured RMS, column norms, compensation means,
        score_every's cached scores) and their counters, JSON-ready: a checkpoint's trainer state
        holds them (float32 bytes, base64), so a resumed run keeps the same sets. Identical on every
        rank (the measurements are averaged over ranks as they are stored), so rank 0's copy serves all."""
        state: dict = {"window": self.window, "scored_at": self.scored_at}
        for key, attr in _STATE_TENSORS.items():
            value = getattr(self, attr)
            state[key] = None if value is None else base64.b64encode(value.detach().float().cpu().numpy().tobytes()).decode()
        return state

    def load_state(self, state: dict) -> None:
        """Put back a :meth:`state`, on the device of the block's weights."""
        device = self.layout.inputs[0].weight.device if self.layout.inputs else torch.device("cpu")
        self.window, self.scored_at = int(state["window"]), int(state["scored_at"])
        for key, attr in _STATE_TENSORS.items():
            encoded = state.get(key)
            value = (
                None if encoded is None else torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype=np.float32).copy())
            )
            setattr(self, attr, None if value is None else value.to(device))


@dataclass
class SampleOutputs:
    """A draw's scoring subsample's full-width input projection outputs (``outputs``, per base
    member, rows ``rows`` of the flattened micro-batch ``source``, None: all of them), until the
    sliced forward of that micro-batch takes them. ``source`` is the detached block input: the same
    storage and version counter as the forward's, so :meth:`measured` tells that micro-batch
    (holding it keeps its storage from being reused by another tensor meanwhile)."""

    source: torch.Tensor
    version: int
    rows: torch.Tensor | None
    outputs: dict[nn.Module, torch.Tensor]
    other: torch.Tensor | None = None  # the rows not given, made by the first member that asks

    @classmethod
    def of(cls, source: torch.Tensor, rows: torch.Tensor | None, outputs: dict[nn.Module, torch.Tensor]) -> SampleOutputs:
        return cls(source, source._version, rows, outputs)

    def measured(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the (unchanged) micro-batch these outputs were measured on."""
        source = self.source
        return (
            x.data_ptr() == source.data_ptr()
            and x.shape == source.shape
            and x.stride() == source.stride()
            and x._version == self.version
        )


def _activation(block: nn.Module, attr: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's activation function: its own attribute, or, for a block whose kernels were swapped
    (Liger-Kernel's fused SwiGLU/GeGLU MLPs keep ``config`` but no ``act_fn``), the one its config names."""
    act = getattr(block, attr, None)
    if act is not None:
        return act
    config = getattr(block, "config", None)
    name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if name is None:
        raise SATError(
            f"{type(block).__name__} has no {attr!r} and no config.hidden_act: metric 'activation' cannot score it; use metric wanda"
        )
    from transformers.activations import ACT2FN

    return ACT2FN[name]
