"""One patched block (an MLP or an attention module): its kept set and its projections' forwards.

SAT never replaces a block's own forward. It binds new forwards onto the block's projection
*instances* (Liger-Kernel style): the input projections return only their kept output features,
the output projection reads only those. Everything between them in the block's unchanged
forward is shape-agnostic: the MLP's activation and product are elementwise, and Llama-style
attention views q/k/v as ``(*shape, -1, head_dim)`` and reads ``num_key_value_groups``, which
dropping whole KV groups leaves intact (so RoPE, sliding windows, soft-capping, Qwen3/Gemma3
q/k norms, biases, eager and sdpa all keep working). With a dense forward (``omit_in: backward``)
the attention core between them is split by head instead, so its backward runs for the kept heads
only (:mod:`sat_trainer.patch.attention_core`). Each projection's own forward hooks still
fire, because the module is still called (under ZeRO-3 the whole block is made a leaf module,
see :func:`sat_trainer.patch.model.apply_sat`, since a draw reads all its projections at once).

The kept set is drawn once per draw number (see :class:`sat_trainer.patch.model.SATHandle`) by
whichever input projection runs first, and reused by every later call with the same number:
the output projection, the other micro-batches of the step and gradient-checkpoint recompute.

A fused input projection (registry ``BlockShape.fused``) is laid out in *parts*, one per segment
(gate, up; q, k, v), each sliced per unit like an unfused input, so its kept output is each
segment's kept rows, segment after segment. A fused attention block splits that output at
offsets it computes from head-count attributes (Phi-3: ``config.num_attention_heads`` and
``num_key_value_heads``); while sparse those read the kept counts (:class:`_HeadCounts`).
"""

from __future__ import annotations

import base64
import copy
import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn

from .. import adapters, importance, selection
from ..errors import SATError
from ..ops import (
    KEEP_INPUTS, KEEP_OUTPUTS, Conv1D, GivenRows, KeptIndex, SliceCache, backward_kept_linear, in_features, kept_linear,
    out_features, out_major_weight, split_rows_linear,
)
from ..schedule import kept_count
from . import attention_core
from .registry import BlockShape

if TYPE_CHECKING:
    from .model import SATHandle

logger = logging.getLogger("sat_trainer")


class BlockUnit:
    """A block whose units (MLP channels or attention KV groups) SAT keeps or omits together.

    ``inputs``/``output`` are the base layers (scored and sliced); the *members* are every layer
    whose forward is patched: the base layers plus, under PEFT LoRA, each adapter's ``lora_B``
    on the input side and ``lora_A`` on the output side (see :mod:`sat_trainer.adapters`).
    """

    def __init__(self, name: str, shape: BlockShape, block: nn.Module, index: int, handle: SATHandle):
        self.name, self.kind, self.index = name, shape.kind, index
        self.block = block
        self.shape = shape
        self._handle = handle
        self.query_heads = shape.kind == "attention" and handle.config.attention_unit == "query_head"
        self.backward_only = handle.config.omit_in in ("backward", "weight_gradient")  # the forward runs dense
        self.full_input_grad = handle.config.omit_in == "weight_gradient"
        # metric activation, MLP blocks: each channel's output RMS and its down column's norm, kept between draws
        # (the score is their product). With activation_scores forward, the training forward refreshes the channels
        # it computes (observe(): the kept ones, or all of them when the forward is dense) and each draw re-measures
        # a rotating window of the channels on the token subsample (_activation_mlp_scores)
        cfg = handle.config
        from_forward = cfg.metric == "activation" and cfg.scores_from_forward()
        self._observes = shape.kind == "mlp" and from_forward
        # ... and when the forward is dense too, a draw waits for the block's own activations: the kept set only
        # matters in backward, so it is drawn at the output projection from this forward's outputs of every
        # channel (read_hidden), not from the previous forward's; the input projections read it in backward.
        # Attention (KV-group units) likewise, at its value projection from every head's values (read_values)
        scores_values = shape.kind == "attention" and from_forward and not self.query_heads
        self._draws_in_forward = self.backward_only and (self._observes or scores_values)
        # ... and when each draw scores every channel on a subsample of the micro-batch it is drawn for (the
        # default under forward_backward), the subsample's full-width gate/up outputs are kept for that
        # micro-batch's sliced forward, which then computes only the other token rows (given_rows)
        self._reuses_sample = (
            shape.kind == "mlp" and cfg.metric == "activation" and not self._observes and not self.backward_only
            and cfg.sparse_tokens == "all"
        )
        self._sample_outputs: _SampleOutputs | None = None
        self._rms: torch.Tensor | None = None
        self._out_norms: torch.Tensor | None = None
        self._window = 0  # the next window _activation_mlp_scores re-measures
        # the token rows (of how many, and their stratum weights) that window was measured on: observe() measures
        # the kept channels on the same rows with the same weights, since an RMS over more tokens is not comparable
        self._sample_rows: torch.Tensor | None = None
        self._sample_weights: torch.Tensor | None = None
        self._sample_of = 0
        # compensation mean: each channel's mean output (measured as the RMS is), and the constant the omitted
        # ones add to the down projection's output for the current draw
        self._compensates = shape.kind == "mlp" and handle.config.compensation == "mean"
        self._mean_hidden: torch.Tensor | None = None
        self.compensation: torch.Tensor | None = None
        self._kv_groups_attr = getattr(block, "num_key_value_groups", None)  # query_head units change it while sparse
        self._head_counts = _HeadCounts(name, block, shape)  # a fused attention block's split counts, kept ones while sparse
        self._saved_forwards: list[tuple[nn.Module, Callable | None]] = []
        self._drawn_for: tuple[int, int] | None = None
        self._scores_cache: torch.Tensor | None = None  # reused for score_every draws
        self._scored_at = 0
        self._index: dict[nn.Module, torch.Tensor] = {}
        self._heads: tuple | None = None  # backward_heads() of the current draw
        self._drawer: nn.Module | None = None  # the input member the block's forward calls first
        self.slices = SliceCache()
        self.rate_scale = 1.0  # layer_rates auto: this block's peak rate over omission_rate (sat_trainer.calibration)
        self._resolve()
        self.kept_units = torch.arange(self.n)

    def _resolve(self) -> None:
        """Read the block's projections (plain or LoRA-wrapped) and check they can be sliced."""
        attrs = (*self.shape.inputs, self.shape.output)
        projections = {a: adapters.resolve(f"{self.name}.{a}", getattr(self.block, a)) for a in attrs}
        self._signature = tuple(p.signature for p in projections.values())
        self.fallback = adapters.unsliceable_reason(projections)
        # query_head units slice q only (k and v stay dense); v still scores them (metric activation)
        sliced = self.shape.inputs[:1] if self.query_heads else self.shape.inputs
        ins = [projections[a] for a in sliced]
        out = projections[self.shape.output]
        self.inputs = [p.base for p in ins]
        self.output = out.base
        self._in_members = self.inputs + [m for p in ins for m in p.lora_out]
        self._out_members = [out.base, *out.lora_in]
        self.n, self.heads_per_unit, self.groups = 0, 1, 1
        self._logical: list[tuple[nn.Module, _Part]] = []
        self._parts: tuple[_Part, ...] = ()
        self._values: tuple[nn.Module, _Part] | None = None  # what read_values reads: v's base layer and its rows
        if self.fallback is None:
            self._logical = self._split_logical_inputs([projections[a].base for a in self.shape.inputs])
            if self.kind == "attention" and self._draws_in_forward:
                self._values = self._logical[2]
            sizes = [part.size for _, part in self._logical]
            self.n, self.heads_per_unit, self.groups = _unit_layout(self.name, self.shape, self.block, sizes, self.query_heads)
            # a fused input's parts: its segments; query_head units slice q only, so k and v stay whole
            self._parts = tuple(_Part(p.start, p.size, i == 0 or not self.query_heads) for i, (_, p) in enumerate(self._logical))
            for member, side in self._members_with_side():
                for part in self._layout(member, side)[1]:
                    if part.sliced:
                        _check_divisible(self.name, member, part.size, self.n)

    def _split_logical_inputs(self, bases: list[nn.Module]) -> list[tuple[nn.Module, _Part]]:
        """The block's logical input projections (gate, up; q, k, v) as (base layer, its rows):
        each unfused input whole, or each segment of the fused one."""
        if not self.shape.fused:
            return [(base, _Part(0, out_features(base))) for base in bases]
        (base,) = bases
        sizes = self._head_counts.segment_sizes(out_features(base))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [(base, _Part(start, size)) for start, size in zip(starts, sizes)]

    def members(self) -> list[nn.Module]:
        return self._in_members + self._out_members

    # ---- patching -------------------------------------------------------------------------

    def patch(self) -> None:
        self._drawer = None
        if self.fallback is not None:
            return
        for member in self._in_members:
            self._bind(member, functools.partial(_input_forward, self, member, member.forward))
        for member in self._out_members:
            self._bind(member, functools.partial(_output_forward, self, member, member.forward))
        if self.kind == "attention":
            attention_core.attach(self.block, self)

    def unpatch(self) -> None:
        attention_core.detach(self.block)
        self._set_query_heads_per_group(None)
        self._head_counts.set(None)
        for proj, previous in reversed(self._saved_forwards):
            del proj.forward
            if previous is not None:
                proj.forward = previous
        self._saved_forwards.clear()

    def _bind(self, proj: nn.Module, forward: Callable) -> None:
        """Set an instance-level forward; ``unpatch`` puts back what the instance had (usually nothing)."""
        self._saved_forwards.append((proj, proj.__dict__.get("forward")))
        proj.forward = forward

    def _refresh(self) -> None:
        """Re-patch if LoRA was added, removed or changed adapters since the last call.

        This is what lets ``get_peft_model`` run after ``apply_sat``: PEFT wraps our patched
        base layer, and its new ``lora_A``/``lora_B`` get patched here, before they run.
        """
        attrs = (*self.shape.inputs, self.shape.output)
        current = tuple(adapters.signature(getattr(self.block, a)) for a in attrs)
        if current == self._signature:
            return
        self.unpatch()
        self._resolve()
        if self.fallback is not None:
            logger.warning("sat_trainer: %s now runs dense: SAT cannot slice %s", self.name, self.fallback)
        self.patch()
        if self._drawn_for is not None and self.fallback is None:
            self._index_members(self.kept_units.to(self.inputs[0].weight.device))

    # ---- the kept set ---------------------------------------------------------------------

    def k(self) -> int:
        """Units kept at the current rate; query_head units keep the same count in every KV group."""
        return self.groups * kept_count(self.n // self.groups, self._handle.rate * self.rate_scale)

    def _set_query_heads_per_group(self, kept_per_group: int | None) -> None:
        """query_head units: the attention forward repeats each KV head for ``num_key_value_groups``
        query heads (eager, and sdpa without native GQA), so while sparse that is the kept count
        per group; dense (None) puts the model's own value back."""
        if self.query_heads and self._kv_groups_attr is not None:
            self.block.num_key_value_groups = kept_per_group or self._kv_groups_attr

    def token_split_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """sparse_tokens context: (dense rows, sparse rows) of x's tokens for an MLP block, else None."""
        return self._handle.token_split_for(x) if self.kind == "mlp" else None

    def is_sparse(self) -> bool:
        """Sliced forward only while training with something to omit: eval and rate 0 run dense."""
        return self.fallback is None and self.block.training and self.k() < self.n

    def input_index(self, member: nn.Module, x: torch.Tensor) -> KeptIndex | None:
        """Kept output features of input-side ``member``; the first input member the block calls
        (learned on the first call) draws if this draw is new. A block that draws later in its forward
        (``_draws_in_forward``) returns a callable that gives them in backward.

        Under ``torch.compile`` only that member's :meth:`_prepare` is left out of the graph (one
        graph break per block, not per projection); the rest reads state that changes only when
        the kept count does (rate, training mode), so recompiles happen at rung edges only.
        """
        if self._drawer is None or member is self._drawer:
            self._prepare(member, x)
        if not self.is_sparse():
            return None
        if self._draws_in_forward:
            # drawn later in this forward (read_hidden, read_values), read in backward: a callable every time, drawn or
            # not, since a checkpoint's recompute must save the tensors its forward saved
            return functools.partial(self._index_drawn_later, member, (self._handle.draw_id, self.k()))
        return self._index[member]

    @torch.compiler.disable
    def _index_drawn_later(self, member: nn.Module, key: tuple[int, int]) -> torch.Tensor:
        if self._drawn_for != key:
            raise SATError(
                f"{self.name}: backward ran for a draw its forward never made or that a later draw replaced; with omit_in "
                "backward and activation_scores forward SAT draws at the block's output projection (MLP) or value projection (attention)"
            )
        return self._index[member]

    @torch.compiler.disable
    def _prepare(self, member: nn.Module, x: torch.Tensor) -> None:
        """Re-patch after LoRA changes, note the sequence length, and draw if this draw is new."""
        self._handle.seq_len = x.shape[-2] if x.dim() > 1 else 1
        self._refresh()
        if self._drawer is None:
            self._drawer = member
        sparse = self.is_sparse()
        # omit_in backward/weight_gradient: the forward is dense, so the block keeps its own GQA repeat count
        # and head counts
        sliced_forward = sparse and not self.backward_only
        self._set_query_heads_per_group(self.k() // self.groups if sliced_forward else None)
        self._head_counts.set(self._kept_rows() if sliced_forward else None)
        if sparse and not self._draws_in_forward:  # else read_hidden or read_values draws, from this forward's activations
            key = (self._handle.draw_id, self.k())
            if self._drawn_for != key:
                self._draw(x, key)

    def _kept_rows(self) -> list[int]:
        """Rows of each fused segment the sliced forward computes at the current kept count."""
        return [part.size // self.n * self.k() if part.sliced else part.size for part in self._parts]

    @torch.compiler.disable
    def backward_heads(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """``((kept query heads, kept KV heads), (omitted query heads, omitted KV heads))`` when this
        attention block's core may run its backward for the kept heads only
        (:mod:`sat_trainer.patch.attention_core`): a dense forward whose input gradient goes through the
        kept units alone (``omit_in: backward``), KV-group units, sparse and drawn; else None."""
        if not (self.kind == "attention" and self.backward_only and not self.full_input_grad and not self.query_heads and self.is_sparse()):
            return None
        if self._drawn_for != (self._handle.draw_id, self.k()):
            return None
        if self._heads is None:
            self._heads = tuple((_expand(units, self.heads_per_unit), units) for units in (self.kept_units, self._omitted_units()))
        return self._heads

    def _omitted_units(self) -> torch.Tensor:
        """The units the current draw omits, ascending; without a host sync (``nonzero`` would be one):
        a stable sort of the kept mask puts the omitted units first, in index order."""
        kept = torch.zeros(self.n, dtype=torch.uint8, device=self.kept_units.device).index_fill_(0, self.kept_units, 1)
        return torch.argsort(kept, stable=True)[: self.n - self.kept_units.numel()]

    def output_index(self, member: nn.Module) -> torch.Tensor | None:
        """Kept input features of output-side ``member`` (drawn by the input side)."""
        if not self.is_sparse():
            return None
        if not torch.compiler.is_compiling() and self._drawn_for != (self._handle.draw_id, self.k()):
            raise SATError(
                f"{self.name}: its output projection ran before its input projections drew a kept set; "
                "SAT needs the block's own forward to call the input projections first"
            )
        return self._index[member]

    def reset_draws(self) -> None:
        """Forget the current draw, cached scores and slices (after a calibration's draws)."""
        self._drawn_for, self._scores_cache, self._sample_outputs = None, None, None
        self._rms = self._out_norms = self._mean_hidden = None
        self._window = 0
        self.slices.clear()
        self._head_counts.forget_copies()

    # ---- what a resumed run needs to draw what the uninterrupted one would -------------------

    _SCORE_TENSORS = ("_rms", "_out_norms", "_mean_hidden", "_scores_cache")

    def score_state(self) -> dict:
        """The scores carried between draws (forward-measured RMS, column norms, compensation means,
        score_every's cached scores) and their counters, JSON-ready: a checkpoint's trainer state
        holds them (float32 bytes, base64), so a resumed run keeps the same sets. Identical on every
        rank (the measurements are averaged over ranks as they are stored), so rank 0's copy serves all."""
        state: dict = {"window": self._window, "scored_at": self._scored_at}
        for name in self._SCORE_TENSORS:
            value = getattr(self, name)
            state[name] = None if value is None else base64.b64encode(value.detach().float().cpu().numpy().tobytes()).decode()
        return state

    def load_score_state(self, state: dict) -> None:
        device = self.inputs[0].weight.device if self.inputs else torch.device("cpu")
        self._window, self._scored_at = int(state["window"]), int(state["scored_at"])
        for name in self._SCORE_TENSORS:
            encoded = state.get(name)
            value = None if encoded is None else torch.from_numpy(np.frombuffer(base64.b64decode(encoded), dtype=np.float32).copy())
            setattr(self, name, None if value is None else value.to(device))

    def unit_gradient_square(self) -> torch.Tensor:
        """Per unit, the squared norm of the gradients its weights hold now (its rows of the input
        members with their bias entries, its columns of the output members), in float32."""
        total = torch.zeros(self.n, device=self.inputs[0].weight.device)
        for member, input_side in self._members_with_side():
            dim, parts = self._layout(member, input_side)
            grads = [(member.weight.grad, dim)] + ([(member.bias.grad, 0)] if input_side and member.bias is not None else [])
            for grad, d in grads:
                if grad is not None:
                    per_feature = grad.float().square().sum(dim=1 - d) if grad.dim() == 2 else grad.float().square()
                    for part in parts:
                        if part.sliced:
                            total += per_feature[part.start : part.start + part.size].reshape(self.n, -1).sum(1)
        return total

    def omitted_parameters(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(trainable tensor, dim, omitted indices along dim) for every slice this draw omitted:
        the rows (outputs) of input-side members with their bias entries, the columns (inputs)
        of output-side members. Empty when the block runs dense."""
        if not self.is_sparse() or self._drawn_for is None:
            return []
        omitted_units = self._omitted_units()
        out = []
        for member, input_side in self._members_with_side():
            dim, parts = self._layout(member, input_side)
            idx = _feature_index(omitted_units, parts, self.n, whole_unsliced=False).to(member.weight.device)
            if member.weight.requires_grad:
                out.append((member.weight, dim, idx))
            if input_side and member.bias is not None and member.bias.requires_grad:
                out.append((member.bias, 0, idx))
        return out

    def _members_with_side(self) -> list[tuple[nn.Module, bool]]:
        return [(m, True) for m in self._in_members] + [(m, False) for m in self._out_members]

    def _layout(self, member: nn.Module, input_side: bool) -> tuple[int, tuple[_Part, ...]]:
        """(sliced weight dim, parts of that dim) of ``member``: a fused input projection (and its
        ``lora_B``, which writes the same rows) holds its segments, any other member one part."""
        dim = _sliced_dim(member, input_side)
        if input_side and self.shape.fused:
            return dim, self._parts
        return dim, (_Part(0, out_features(member) if input_side else in_features(member)),)

    def kept_query_or_channels(self) -> torch.Tensor:
        """Kept MLP channel indices, or kept query-head indices for attention (on the CPU: a host
        sync, so call it outside the training step)."""
        return _expand(self.kept_units, self.heads_per_unit).cpu()

    def _draw(self, x: torch.Tensor, key: tuple[int, int], hidden: bool = False) -> None:
        """Draw the kept set for ``key`` from the block's input ``x``, or (``hidden``, a draw
        :meth:`read_hidden` or :meth:`read_values` makes) from the down projection's input of every
        channel or the values of every head."""
        cfg = self._handle.config
        generator = selection.generator_for(cfg.seed, key[0], self.index, x.device) if _draws_random(cfg) else None
        self._sample_outputs = None  # a draw from cached scores (score_every) measures nothing to reuse
        with torch.no_grad():
            if self._scores_cache is None or key[0] - self._scored_at >= cfg.score_every:
                scores = self._scores(x.detach(), generator, hidden)
                # MLP activation scores are built from statistics averaged over ranks as they were stored (_store)
                self._scores_cache = scores if self._stores_statistics() else self._handle.sync_scores(scores)
                self._scored_at = key[0]
            scores = self._scores_cache
            k = key[1]
            if cfg.selection == "topk":
                kept = selection.topk(scores, k, self.groups)
            else:
                kept = selection.sampling(scores, k, cfg.temperature, generator, self.groups)
            if self._compensates:
                self.compensation = _omitted_mean_output(self._mean_hidden, kept, out_major_weight(self.output))
        self.kept_units = kept  # stays on the device: reading it here would be a host sync per block
        self._index_members(kept)
        self._drawn_for = key

    def _index_members(self, kept: torch.Tensor) -> None:
        self.slices.clear()
        self._heads = None
        self._index = {}
        for member, side in self._members_with_side():
            self._index[member] = _feature_index(kept, self._layout(member, side)[1], self.n)

    @torch.compiler.disable
    def read_hidden(self, h: torch.Tensor) -> None:
        """The down projection's input ``h`` (every channel's output), each time a block that
        draws at its output runs sparse: a draw waiting for this forward's activations is made from
        them, else (a later micro-batch, a checkpoint's recompute) they refresh the statistics
        (:meth:`observe`). Outside the graph under ``torch.compile``, so the draw is kept."""
        key = (self._handle.draw_id, self.k())
        if self._drawn_for != key:
            self._draw(h, key, hidden=True)
        else:
            self.observe(h)

    def hook_scored(self, store: Callable[[torch.Tensor], None]) -> torch.utils.hooks.RemovableHandle:
        """Hook that passes ``store`` (detached) what this block's draws score in training, each time the
        block runs: the block's input, or, for a block that draws in its forward (``_draws_in_forward``,
        then ``_scores(..., hidden=True)``), the down projection's input or the values (:meth:`read_values`)."""
        if self._values is not None:
            return self._values[0].register_forward_hook(lambda m, a, out: store(self._value_rows(out).detach()))
        module = self.output if self._draws_in_forward else self.inputs[0]
        return module.register_forward_pre_hook(lambda m, a: store(a[0].detach()))

    @torch.compiler.disable
    def read_values(self, out: torch.Tensor) -> None:
        """The value projection's output ``out`` (its base layer's: a fused qkv's whole output), each
        time an attention block that draws in its forward runs sparse: a draw waiting for this
        forward's values is made from every head's values on all real tokens (a checkpoint's
        recompute or a later micro-batch of the same draw changes nothing)."""
        key = (self._handle.draw_id, self.k())
        if self._drawn_for != key:
            self._draw(self._value_rows(out), key, hidden=True)

    def _value_rows(self, out: torch.Tensor) -> torch.Tensor:
        """The values in the value projection's base output: all of it, or a fused qkv's v features."""
        part = self._values[1]
        return out if part.size == out.shape[-1] else out[..., part.start : part.start + part.size]

    def observe(self, h: torch.Tensor) -> None:
        """Refresh the RMS (and, with compensation, the mean) of the channels whose outputs ``h`` the
        training forward just computed: the down projection's input, the kept channels' or, when the
        forward is dense (``omit_in: backward``), every channel's. One reduction over ``h``, no
        matmul; the next draw scores from it. A sparse forward measures its kept channels on the
        token rows the draw's window was measured on (same rows, same weights): an RMS
        over all of the micro-batch's tokens is not comparable with one over a subsample, since
        LLM activations are heavy-tailed and a subsample usually misses the rare large tokens, so
        the kept channels would look larger than the re-measured ones and stay kept (measured on
        SmolLM2-135M: +1.43% held-out loss where the subsample metric gave +0.79%). A dense forward
        measures every channel, on all tokens. Inside a compiled graph nothing is refreshed (a side
        effect the graph would not keep): the re-measured window alone keeps the scores current
        (:meth:`read_hidden` calls it from outside the graph)."""
        if torch.compiler.is_compiling() or self._rms is None:
            return
        with torch.no_grad():
            h, mask = self._zero_padding(h.detach())
            flat = h.reshape(-1, h.shape[-1])
            weights = None if mask is None else mask.reshape(-1)
            if self._sample_rows is not None and flat.shape[0] == self._sample_of and not self.backward_only:
                flat, weights = flat.index_select(0, self._sample_rows), self._sample_weights
            kept = None if flat.shape[1] == self.n and self.backward_only else self.kept_units
            if kept is not None and flat.shape[1] == self.n:  # split token rows: the sparse rows' omitted features are zeros
                flat = flat.index_select(1, kept)
            self._store(self._rms, kept, importance.channel_rms(flat, weights))
            if self._compensates:
                self._store(self._mean_hidden, kept, importance.real_token_mean(flat, weights))

    def _store(self, stats: torch.Tensor, kept: torch.Tensor | slice | None, values: torch.Tensor) -> None:
        """Write per-channel measurements into ``stats`` at the ``kept`` channels (a window slice;
        None: all), averaged over ranks first: every rank then holds the same statistics, so the
        same kept sets follow, and a checkpoint's copy (rank 0's) is every rank's."""
        values = self._handle.sync_scores(values)
        if kept is None:
            stats.copy_(values)
        elif isinstance(kept, slice):
            stats[kept] = values
        else:
            stats.index_copy_(0, kept, values)

    def _zero_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` with its padding tokens' rows zeroed (they score nothing), and the padding mask."""
        mask = self._handle.token_mask_for(x)
        return (x if mask is None else x * mask.reshape(*x.shape[:-1], 1)), mask

    def _scores(self, x: torch.Tensor, generator: torch.Generator | None, hidden: bool = False) -> torch.Tensor:
        if self._stores_statistics():
            return self._activation_mlp_scores(x, generator, hidden)
        cfg = self._handle.config
        in_weights, _ = self._logical_inputs()
        if cfg.metric == "uniform":
            return importance.uniform(self.n, generator, x.device)
        if cfg.metric == "magnitude":
            return importance.magnitude(in_weights, out_major_weight(self.output), self.n)
        x, mask = self._zero_padding(x)  # and subsamples draw real tokens first
        if cfg.metric == "wanda":
            return importance.wanda(x, in_weights, self.n)
        kv_groups = self.groups if self.query_heads else self.n
        if hidden:  # this dense forward's own values, every real token (read_values)
            return importance.value_scores(x.reshape(-1, x.shape[-1]), out_major_weight(self.output), kv_groups, self.query_heads)
        starts = self._handle.sequence_starts_for(x)
        if cfg.metric == "maxip":
            return importance.maxip(x, in_weights[0], self.n, cfg.maxip_tokens, generator, mask, starts)
        tokens = x.numel() // x.shape[-1]
        size = importance.subsample_size(tokens, cfg.activation_tokens, cfg.activation_token_fraction)
        sample, weights = importance.subsample_tokens(x, size, generator, mask, starts)
        values, value_bias = self._logical_weight(2)  # v_proj, or the v segment of a fused qkv_proj
        return importance.activation_attention(
            sample, values, value_bias, out_major_weight(self.output), kv_groups, self.query_heads, weights
        )

    def _activation_mlp_scores(self, x: torch.Tensor, generator: torch.Generator | None, hidden: bool = False) -> torch.Tensor:
        """The activation scores of every channel: its output RMS times its down column's norm.

        ``hidden`` (omit_in backward, :meth:`read_hidden`): ``x`` is this dense forward's down
        projection input, so every channel's RMS is read from it on all real tokens, no matmul.
        Otherwise ``x`` is the block's input: the first draw (and every draw with
        ``activation_scores: subsample``) measures all channels on a token subsample; later ones,
        with ``forward``, measure only the next window of ``ceil(n / remeasure_every)`` contiguous
        channels (their rows of gate/up and columns of down are views, no gather), the training
        forward having refreshed the kept channels' RMS already (:meth:`observe`). The window also
        bounds how stale an omitted channel's score and every down column's norm can get."""
        cfg = self._handle.config
        first = self._rms is None
        window = slice(0, self.n) if first or not self._observes else self._next_window(cfg.remeasure_every)
        if first:
            self._rms, self._out_norms = torch.zeros(self.n, device=x.device), torch.zeros(self.n, device=x.device)
            self._mean_hidden = torch.zeros(self.n, device=x.device) if self._compensates else None
        self._out_norms[window] = importance.output_column_norms(out_major_weight(self.output)[:, window])
        if hidden:
            self.observe(x)
            return self._rms * self._out_norms
        # the subsample draws sequence starts, then real tokens, first; padding rows weigh 0 in every statistic, so
        # they need no zeroing here, and the outputs on them are the forward's own (reusable)
        mask = self._handle.token_mask_for(x)
        flat = x.reshape(-1, x.shape[-1])
        size = importance.subsample_size(flat.shape[0], cfg.activation_tokens, cfg.activation_token_fraction)
        rows, sample_weights = importance.stratified_sample(
            flat.shape[0], size, generator, mask, self._handle.sequence_starts_for(x), flat.device
        )
        self._sample_rows, self._sample_weights, self._sample_of = rows, sample_weights, flat.shape[0]
        sample = flat if rows is None else flat.index_select(0, rows)
        weights, biases = self._logical_inputs()
        weights, biases = [w[window] for w in weights], [None if b is None else b[window] for b in biases]
        outputs = [] if self._reuses_sample else None
        measured = importance.mlp_hidden(sample, weights, biases, _activation(self.block, self.shape.activation), outputs)
        if outputs:
            self._sample_outputs = _SampleOutputs.of(x, rows, self._outputs_by_member(outputs))
        self._store(self._rms, window, importance.channel_rms(measured, sample_weights))
        if self._compensates:
            self._store(self._mean_hidden, window, importance.real_token_mean(measured, sample_weights))
        return self._rms * self._out_norms

    def _outputs_by_member(self, logical: list[torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
        """Each input projection's full-width output, from its logical inputs' (a fused gate_up's
        segments, in its feature order)."""
        parts: dict[nn.Module, list[torch.Tensor]] = {}
        for (base, _), output in zip(self._logical, logical):
            parts.setdefault(base, []).append(output)
        return {base: outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1) for base, outs in parts.items()}

    def given_rows(self, member: nn.Module, x: torch.Tensor) -> GivenRows | None:
        """What input projection ``member`` of a block that reuses its scoring subsample
        (``_reuses_sample``) knows already of its output on ``x``: the subsample's rows, when ``x``
        is the micro-batch the draw measured, each member's once; an empty :class:`GivenRows`
        otherwise, so that every call of the member goes through the same op (a checkpoint's
        recompute must save what its forward saved). None: the plain op (other blocks and members,
        LoRA's ``lora_B``, and under ``torch.compile``, where the draw's side state is not traced)."""
        if not self._reuses_sample or not any(member is base for base in self.inputs) or torch.compiler.is_compiling():
            return None
        record = self._sample_outputs
        if record is None or not record.measured(x) or member not in record.outputs:
            return GivenRows()
        if record.rows is not None and record.other is None:
            record.other = importance.other_rows(record.rows, x.numel() // x.shape[-1])
        given = GivenRows(record.rows, record.other, record.outputs.pop(member))
        if not record.outputs:  # every member has its rows: nothing stays alive past this forward
            self._sample_outputs = None
        return given

    def _stores_statistics(self) -> bool:
        return self.kind == "mlp" and self._handle.config.metric == "activation"

    def _next_window(self, remeasure_every: int) -> slice:
        size = -(-self.n // remeasure_every)
        start = self._window * size
        self._window = (self._window + 1) % -(-self.n // size)
        return slice(start, min(start + size, self.n))

    def _logical_inputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Out-major weights and biases of the sliced logical inputs (gate, up; q, k, v; query_head
        units: q only): a fused projection's segments are views of its weight, so every metric
        scores it like separate projections."""
        pairs = [self._logical_weight(i) for i in range(1 if self.query_heads else len(self._logical))]
        return [w for w, _ in pairs], [b for _, b in pairs]

    def _logical_weight(self, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Out-major weight rows and bias entries (views) of logical input ``position`` (q, k, v: 0, 1, 2)."""
        base, part = self._logical[position]
        rows = slice(part.start, part.start + part.size)
        return out_major_weight(base)[rows], None if base.bias is None else base.bias[rows]


def _input_forward(unit: BlockUnit, proj: nn.Module, dense: Callable, x: torch.Tensor) -> torch.Tensor:
    idx = unit.input_index(proj, x)  # None: the block runs dense
    out = _sliced(unit, proj, dense, x, idx, KEEP_OUTPUTS)
    if idx is not None and unit._values is not None and proj is unit._values[0]:
        unit.read_values(out)
    return out


def _output_forward(unit: BlockUnit, proj: nn.Module, dense: Callable, h: torch.Tensor) -> torch.Tensor:
    if unit._observes and proj is unit.output and unit.is_sparse():
        if unit._draws_in_forward:
            unit.read_hidden(h)
        else:
            unit.observe(h)
    idx = unit.output_index(proj)
    out = _sliced(unit, proj, dense, h, idx, KEEP_INPUTS)
    if idx is not None and unit.compensation is not None and proj is unit.output:
        out = out + unit.compensation.to(out.dtype)
    return out


def _sliced(unit: BlockUnit, proj: nn.Module, dense: Callable, x: torch.Tensor, idx: KeptIndex | None, dim: int) -> torch.Tensor:
    if idx is None:
        return dense(x)
    rows = unit.token_split_for(x)
    if rows is not None:
        return split_rows_linear(proj, dense, x, rows, idx, dim, unit.backward_only, unit.slices, unit.full_input_grad)
    if unit.backward_only:
        return backward_kept_linear(proj, x, idx, dim, unit.full_input_grad)
    return kept_linear(proj, x, idx, dim, unit.slices, unit.given_rows(proj, x) if dim == KEEP_OUTPUTS else None)


def _omitted_mean_output(mean_hidden: torch.Tensor, kept: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """``W_out[:, omitted] @ mean_h[omitted]``: what the omitted channels add on average, as a constant."""
    omitted = torch.ones_like(mean_hidden).index_fill_(0, kept, 0.0)
    return out_weight @ (mean_hidden * omitted).to(out_weight.dtype)  # in the weight's dtype: no float copy of it


def _activation(block: nn.Module, attr: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The MLP's activation function: its own attribute, or, for a block whose kernels were swapped
    (Liger-Kernel's fused SwiGLU/GeGLU MLPs keep ``config`` but no ``act_fn``), the one its config names."""
    act = getattr(block, attr, None)
    if act is not None:
        return act
    config = getattr(block, "config", None)
    name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    if name is None:
        raise SATError(f"{type(block).__name__} has no {attr!r} and no config.hidden_act: metric 'activation' cannot score it; use metric wanda")
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _draws_random(cfg) -> bool:
    """Whether a draw uses random numbers (wanda or magnitude with topk do not: no generator)."""
    return cfg.metric in ("uniform", "maxip", "activation") or cfg.selection == "sampling"


@dataclass
class _SampleOutputs:
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
    def of(cls, source: torch.Tensor, rows: torch.Tensor | None, outputs: dict[nn.Module, torch.Tensor]) -> _SampleOutputs:
        return cls(source, source._version, rows, outputs)

    def measured(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the (unchanged) micro-batch these outputs were measured on."""
        source = self.source
        return x.data_ptr() == source.data_ptr() and x.shape == source.shape and x.stride() == source.stride() and x._version == self.version


@dataclass(frozen=True)
class _Part:
    """``size`` features of a member's sliced dim from ``start`` (one segment of a fused input, or
    all of them): each of the ``n`` units owns ``size // n`` contiguous ones, or, not ``sliced``
    (a fused qkv's k and v under query_head units), the part is kept whole."""

    start: int
    size: int
    sliced: bool = True


def _expand(kept: torch.Tensor, chunk: int) -> torch.Tensor:
    """Unit indices -> feature indices, each unit owning ``chunk`` contiguous features."""
    return kept if chunk == 1 else (kept.unsqueeze(1) * chunk + torch.arange(chunk, device=kept.device)).reshape(-1)


def _feature_index(units: torch.Tensor, parts: tuple[_Part, ...], n: int, whole_unsliced: bool = True) -> torch.Tensor:
    """Unit indices -> feature indices of a member laid out in ``parts``: part after part, so each
    segment's kept features stay contiguous (``[gate_kept | up_kept]``, ``[q_kept | k_kept | v_kept]``)
    for the block's own split; an unsliced part whole (kept features) or not at all (omitted ones)."""
    pieces = []
    for part in parts:
        if part.sliced:
            idx = _expand(units, part.size // n)
            pieces.append(idx + part.start if part.start else idx)
        elif whole_unsliced:
            pieces.append(torch.arange(part.start, part.start + part.size, device=units.device))
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else units.new_empty(0)


def _sliced_dim(member: nn.Module, input_side: bool) -> int:
    """The weight dim SAT slices: outputs on the input side, inputs on the output side (Conv1D stores ``(in, out)``)."""
    conv = isinstance(member, Conv1D)
    return (1 if conv else 0) if input_side else (0 if conv else 1)


def _head_dim(name: str, block: nn.Module) -> int:
    head_dim = getattr(block, "head_dim", None)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise SATError(f"{name}: attention module has no integer 'head_dim' attribute; cannot find its heads")
    return head_dim


def _unit_layout(name: str, shape: BlockShape, block: nn.Module, sizes: list[int], query_heads: bool) -> tuple[int, int, int]:
    """(number of units, query heads per unit, groups the units split into evenly) from the logical
    inputs' output sizes: channels for MLPs; KV groups for attention (q, k, v), or query heads in
    KV groups for ``attention_unit: query_head``."""
    if shape.kind == "mlp":
        return sizes[0], 1, 1
    head_dim = _head_dim(name, block)
    q_heads = sizes[0] // head_dim
    kv_heads = sizes[1] // head_dim
    if kv_heads == 0 or q_heads % kv_heads:
        raise SATError(f"{name}: {q_heads} query heads do not split into {kv_heads} KV groups")
    return (q_heads, 1, kv_heads) if query_heads else (kv_heads, q_heads // kv_heads, 1)


def _check_divisible(name: str, proj: nn.Module, features: int, n: int) -> None:
    if features % n:
        raise SATError(f"{name}: projection {type(proj).__name__} has {features} features, not a multiple of {n} units")


class _HeadCounts:
    """The head-count attributes a fused attention block's forward splits its fused output by
    (registry ``Segment.heads``; Phi-3: ``config.num_attention_heads``, ``num_key_value_heads``).

    Their dense values size the segments. While the block runs sliced they must read the kept
    counts, or the block would split ``[q_kept | k_kept | v_kept]`` at the dense offsets; they are
    set on this block instance only: a plain attribute directly, a dotted one (``config.x``) on a
    shallow copy of the object it lives in, so the model's shared config (read by every other
    layer, saved with the model) is never written. ``set(None)`` puts the block's own objects back.
    Copies are made once per kept count (a new object per step would make ``torch.compile`` guard
    on a new config each step) and dropped with the block's draws (``reset_draws``)."""

    def __init__(self, name: str, block: nn.Module, shape: BlockShape):
        self.name, self.block, self.shape = name, block, shape
        self.paths = list(dict.fromkeys(s.heads for s in shape.fused if s.heads is not None))
        self.dense = {p: _read_path(name, block, p) for p in self.paths}
        self._originals = {root: getattr(block, root) for root in {p.split(".")[0] for p in self.paths}}
        self._copies: dict[tuple[int, ...], dict[str, object]] = {}

    def segment_sizes(self, features: int) -> list[int]:
        """Output rows of each segment of the fused input projection, which has ``features``."""
        segments = self.shape.fused
        if not self.paths:  # equal shares ([gate | up])
            if features % len(segments):
                raise SATError(f"{self.name}: fused {self.shape.inputs[0]} has {features} output features, not {len(segments)} equal parts")
            return [features // len(segments)] * len(segments)
        head_dim = _head_dim(self.name, self.block)
        sizes = [self.dense[s.heads] * head_dim for s in segments]
        if sum(sizes) != features:
            described = " + ".join(f"{s.name}: {s.heads}={self.dense[s.heads]} x head_dim {head_dim}" for s in segments)
            raise SATError(f"{self.name}: fused {self.shape.inputs[0]} has {features} output features, but its segments ({described}) sum to {sum(sizes)}")
        return sizes

    def set(self, kept_rows: list[int] | None) -> None:
        """While sliced, each segment's attribute reads its kept rows' head count; None: the dense values."""
        if not self.paths:
            return
        if kept_rows is None:
            for root, original in self._originals.items():
                if self.block.__dict__.get(root) is not original:
                    setattr(self.block, root, original)
            return
        counts = self._kept_counts(kept_rows)
        key = tuple(counts[p] for p in self.paths)
        if key not in self._copies:
            self._copies[key] = self._replaced_roots(counts)
        for root, value in self._copies[key].items():
            setattr(self.block, root, value)

    def forget_copies(self) -> None:
        self._copies.clear()

    def _kept_counts(self, kept_rows: list[int]) -> dict[str, int]:
        head_dim = _head_dim(self.name, self.block)
        counts: dict[str, int] = {}
        for segment, rows in zip(self.shape.fused, kept_rows):
            if counts.setdefault(segment.heads, rows // head_dim) != rows // head_dim:
                raise SATError(f"{self.name}: segments sharing {segment.heads!r} would keep different head counts")
        return counts

    def _replaced_roots(self, counts: dict[str, int]) -> dict[str, object]:
        """{root attribute: its value with the kept counts}: an int, or a shallow copy of the original object."""
        roots: dict[str, object] = dict(self._originals)
        for path, count in counts.items():
            root, *rest = path.split(".")
            roots[root] = _with_attribute(roots[root], rest, count) if rest else count
        return roots


def _read_path(name: str, block: nn.Module, path: str) -> int:
    """The head count at attribute ``path`` of ``block``; raises naming the block if it has none."""
    value: object = block
    for attr in path.split("."):
        if not hasattr(value, attr):
            raise SATError(f"{name}: {type(block).__name__} has no {path!r}, the head count its fused input is split by")
        value = getattr(value, attr)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SATError(f"{name}: {type(block).__name__}.{path} is {value!r}, not a head count")
    return value


def _with_attribute(obj: object, path: list[str], value: int) -> object:
    """A shallow copy of ``obj`` whose attribute ``path`` is ``value`` (objects on the path copied too)."""
    new = copy.copy(obj)
    head, *rest = path
    setattr(new, head, _with_attribute(getattr(obj, head), rest, value) if rest else value)
    return new
