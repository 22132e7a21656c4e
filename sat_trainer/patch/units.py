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

The kept set is drawn once per draw number (:class:`~sat_trainer.patch.forward_context.ForwardContext`)
by whichever input projection runs first, and reused by every later call with the same number:
the output projection, the other micro-batches of the step and gradient-checkpoint recompute.
Where the units sit in the projections is :mod:`~sat_trainer.patch.layout`'s; how they are scored
is :mod:`~sat_trainer.patch.scoring`'s; the head counts a sliced attention forward reads are
:mod:`~sat_trainer.patch.head_attributes`'.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from .. import adapters, selection
from ..errors import SATError
from ..ops import (
    KEEP_INPUTS,
    KEEP_OUTPUTS,
    KeptIndex,
    SliceCache,
    backward_kept_linear,
    kept_linear,
    split_rows_linear,
)
from ..schedule import kept_count
from . import attention_core
from .forward_context import ForwardContext
from .head_attributes import HeadAttributes
from .layout import BlockLayout, expand
from .registry import BlockShape
from .scoring import BlockScorer

logger = logging.getLogger("sat_trainer")


class BlockUnit:
    """A block whose units (MLP channels or attention KV groups) SAT keeps or omits together.

    ``layout`` says where the units sit in the block's projections (``inputs``, ``output``, ``n``,
    ``groups``, ``heads_per_unit`` and ``fallback`` are its, for readers), ``scorer`` scores them,
    ``context`` is the model's shared per-forward state; ``kept_units`` is the latest draw.
    """

    def __init__(self, name: str, shape: BlockShape, block: nn.Module, index: int, context: ForwardContext):
        cfg = context.config
        self.name, self.kind, self.index = name, shape.kind, index
        self.block, self.shape, self.context = block, shape, context
        self.query_heads = shape.kind == "attention" and cfg.attention_unit == "query_head"
        self.backward_only = cfg.omit_in in ("backward", "weight_gradient")  # the forward runs dense
        self.full_input_grad = cfg.omit_in == "weight_gradient"
        # sparse_tokens context with a sliced forward: the MLP block's own forward runs twice, once per row set
        self.splits_block = shape.kind == "mlp" and cfg.sparse_tokens == "context" and not self.backward_only
        self._row_set: str | None = None  # "dense" or "sparse" while _split_block_forward runs one row set
        self.scorer = BlockScorer(shape, block, context, self.query_heads, self.backward_only)
        self.heads = HeadAttributes(name, block, shape, self.query_heads)  # kept head counts while sliced
        self.compensation: torch.Tensor | None = None  # compensation mean: what the omitted channels add, this draw
        self.slices = SliceCache()
        self.rate_scale = 1.0  # layer_rates auto: this block's peak rate over omission_rate (sat_trainer.calibration)
        self._saved_forwards: list[tuple[nn.Module, Callable | None]] = []
        self._drawn_for: tuple[int, int] | None = None  # (draw number, kept count) of the current draw
        self._index: dict[nn.Module, torch.Tensor] = {}  # member -> its kept feature indices
        self._split_heads: tuple | None = None  # backward_heads() of the current draw
        self._drawer: nn.Module | None = None  # the input member the block's forward calls first
        self._resolve()
        self.kept_units = torch.arange(self.n)

    def _resolve(self) -> None:
        """Read the block's projections (plain or LoRA-wrapped) into its layout, checking they can be sliced."""
        layout = self.layout = BlockLayout(self.name, self.shape, self.block, self.query_heads, self.heads)
        self.scorer.use_layout(layout)
        self.fallback, self.inputs, self.output = layout.fallback, layout.inputs, layout.output
        self.n, self.heads_per_unit, self.groups = layout.n, layout.heads_per_unit, layout.groups

    def members(self) -> list[nn.Module]:
        return self.layout.members()

    # ---- patching -------------------------------------------------------------------------

    def patch(self) -> None:
        """Bind the sliced forwards onto the members (nothing for a block that falls back to dense)."""
        self._drawer = None
        if self.fallback is not None:
            return
        for member in self.layout.in_members:
            self._bind(member, functools.partial(_input_forward, self, member, member.forward))
        for member in self.layout.out_members:
            self._bind(member, functools.partial(_output_forward, self, member, member.forward))
        if self.kind == "attention":
            attention_core.attach(self.block, self)
        if self.splits_block:
            self._bind(self.block, functools.partial(_split_block_forward, self, self.block.forward))

    def unpatch(self) -> None:
        """Put back what the members' instances had, and the block's own head counts."""
        attention_core.detach(self.block)
        self.heads.set_dense()
        for proj, previous in reversed(self._saved_forwards):
            del proj.forward
            if previous is not None:
                proj.forward = previous
        self._saved_forwards.clear()

    def _bind(self, proj: nn.Module, forward: Callable) -> None:
        """Set an instance-level forward; ``unpatch`` puts back what the instance had (usually nothing)."""
        self._saved_forwards.append((proj, proj.__dict__.get("forward")))
        proj.forward = forward

    def _repatch_if_adapters_changed(self) -> None:
        """Re-patch if LoRA was added, removed or changed adapters since the last call.

        This is what lets ``get_peft_model`` run after ``apply_sat``: PEFT wraps our patched
        base layer, and its new ``lora_A``/``lora_B`` get patched here, before they run.
        """
        attrs = (*self.shape.inputs, self.shape.output)
        current = tuple(adapters.signature(getattr(self.block, a)) for a in attrs)
        if current == self.layout.signature:
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
        return self.groups * kept_count(self.n // self.groups, self.context.rate_for(self.kind) * self.rate_scale)

    def token_split_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """sparse_tokens context: (dense rows, sparse rows) of x's tokens for an MLP block, else None (also
        inside one row set's call of :func:`_split_block_forward`, whose rows are split already)."""
        return self.context.token_split_for(x) if self.kind == "mlp" and self._row_set is None else None

    @contextlib.contextmanager
    def rows(self, row_set: str, rows: torch.Tensor):
        """While the block's own forward runs on one row set of the token split (``rows`` of the forward's
        flattened tokens): ``"dense"`` runs every projection dense, ``"sparse"`` through the kept slices; the
        kept set was drawn before, from all rows (:meth:`prepare_split`)."""
        self._row_set, self.context.rows = row_set, rows
        try:
            yield
        finally:
            self._row_set, self.context.rows = None, None

    def prepare_split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The token split of the MLP block's input ``x`` if the block runs it sparse now, after the block's
        per-forward preparation from all of ``x`` (the draw is the one the unsplit forward would make); else
        None, and the block's own forward runs as usual."""
        rows = self.token_split_for(x)
        if rows is None:
            return None
        self._prepare_forward(None, x)
        return rows if self.is_sparse() else None

    def is_sparse(self) -> bool:
        """Sliced forward only while training with something to omit: eval and rate 0 run dense."""
        return self.fallback is None and self.block.training and self.k() < self.n

    def input_index(self, member: nn.Module, x: torch.Tensor) -> KeptIndex | None:
        """Kept output features of input-side ``member``; the first input member the block calls
        (learned on the first call) draws if this draw is new. A block that draws later in its forward
        (``scorer.draws_in_forward``) returns a callable that gives them in backward.

        Under ``torch.compile`` only that member's :meth:`_prepare_forward` is left out of the graph
        (one graph break per block, not per projection); the rest reads state that changes only when
        the kept count does (rate, training mode), so recompiles happen at rung edges only.
        """
        if self._row_set == "dense":
            return None
        if self._row_set is None and (self._drawer is None or member is self._drawer):
            self._prepare_forward(member, x)
        if not self.is_sparse():
            return None
        if self.scorer.draws_in_forward:
            # drawn later in this forward (read_hidden, read_values), read in backward: a callable every time, drawn or
            # not, since a checkpoint's recompute must save the tensors its forward saved
            return functools.partial(self._index_drawn_later, member, (self.context.draw_id, self.k()))
        return self._index[member]

    @torch.compiler.disable
    def _index_drawn_later(self, member: nn.Module, key: tuple[int, int]) -> torch.Tensor:
        if self._drawn_for != key:
            raise SATError(
                f"{self.name}: backward ran for a draw its forward never made or that a later draw replaced; with omit_in "
                "backward and activation_scores training_forward SAT draws at the block's output projection (MLP) or value projection (attention)"
            )
        return self._index[member]

    @torch.compiler.disable
    def _prepare_forward(self, member: nn.Module | None, x: torch.Tensor) -> None:
        """Re-patch after LoRA changes, note the sequence length, set the head counts, and draw if this draw is
        new; ``member`` (the input member calling, None from :meth:`prepare_split`) becomes the drawer if none is."""
        self.context.note_sequence_length(x)
        self._repatch_if_adapters_changed()
        if self._drawer is None and member is not None:
            self._drawer = member
        sparse = self.is_sparse()
        # omit_in backward/weight_gradient: the forward is dense, so the block keeps its own GQA repeat count and head counts
        if sparse and not self.backward_only:
            self.heads.set_sliced(self.k() // self.groups, self.layout.kept_rows(self.k()))
        else:
            self.heads.set_dense()
        if sparse and not self.scorer.draws_in_forward:  # else read_hidden or read_values draws, from this forward's activations
            key = (self.context.draw_id, self.k())
            if self._drawn_for != key:
                self._draw(x, key)

    @torch.compiler.disable
    def backward_heads(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """``((kept query heads, kept KV heads), (omitted query heads, omitted KV heads))`` when this
        attention block's core may run its backward for the kept heads only
        (:mod:`sat_trainer.patch.attention_core`): a dense forward whose input gradient goes through the
        kept units alone (``omit_in: backward``), KV-group units, sparse and drawn; else None."""
        if not (
            self.kind == "attention"
            and self.backward_only
            and not self.full_input_grad
            and not self.query_heads
            and self.is_sparse()
        ):
            return None
        if self._drawn_for != (self.context.draw_id, self.k()):
            return None
        if self._split_heads is None:
            self._split_heads = tuple(
                (expand(units, self.heads_per_unit), units) for units in (self.kept_units, self._omitted_units())
            )
        return self._split_heads

    def _omitted_units(self) -> torch.Tensor:
        """The units the current draw omits, ascending; without a host sync (``nonzero`` would be one):
        a stable sort of the kept mask puts the omitted units first, in index order."""
        kept = torch.zeros(self.n, dtype=torch.uint8, device=self.kept_units.device).index_fill_(0, self.kept_units, 1)
        return torch.argsort(kept, stable=True)[: self.n - self.kept_units.numel()]

    def output_index(self, member: nn.Module) -> torch.Tensor | None:
        """Kept input features of output-side ``member`` (drawn by the input side)."""
        if self._row_set == "dense" or not self.is_sparse():
            return None
        if not torch.compiler.is_compiling() and self._drawn_for != (self.context.draw_id, self.k()):
            raise SATError(
                f"{self.name}: its output projection ran before its input projections drew a kept set; "
                "SAT needs the block's own forward to call the input projections first"
            )
        return self._index[member]

    def reset_draws(self) -> None:
        """Forget the current draw, cached scores and slices (after a calibration's draws)."""
        self._drawn_for = None
        self.scorer.reset()
        self.slices.clear()
        self.heads.forget_copies()

    def unit_gradient_square(self) -> torch.Tensor:
        """Per unit, the squared norm of the gradients its weights hold now (:meth:`BlockLayout.unit_gradient_square`)."""
        return self.layout.unit_gradient_square()

    def omitted_parameters(self) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(trainable tensor, dim, omitted indices along dim) for every slice this draw omitted:
        the rows (outputs) of input-side members with their bias entries, the columns (inputs)
        of output-side members. Empty when the block runs dense."""
        if not self.is_sparse() or self._drawn_for is None:
            return []
        return self.layout.trainable_slices(self._omitted_units())

    def kept_query_or_channels(self) -> torch.Tensor:
        """Kept MLP channel indices, or kept query-head indices for attention (on the CPU: a host
        sync, so call it outside the training step)."""
        return expand(self.kept_units, self.heads_per_unit).cpu()

    def _draw(self, x: torch.Tensor, key: tuple[int, int], hidden: bool = False) -> None:
        """Draw the kept set for ``key`` (draw number, kept count) from the block's input ``x``, or
        (``hidden``, a draw :meth:`read_hidden` or :meth:`read_values` makes) from the down projection's
        input of every channel or the values of every head."""
        cfg = self.context.config
        generator = selection.generator_for(cfg.seed, key[0], self.index, x.device) if _draws_random(cfg) else None
        with torch.no_grad():
            scores = self.scorer.scores_for_draw(x, key[0], generator, hidden)
            if cfg.selection == "topk":
                kept = selection.topk(scores, key[1], self.groups)
            else:
                kept = selection.sampling(scores, key[1], cfg.temperature, generator, self.groups)
            if self.scorer.compensates:
                self.compensation = self.scorer.omitted_mean_output(kept)
        self.kept_units = kept  # stays on the device: reading it here would be a host sync per block
        self._index_members(kept)
        self._drawn_for = key

    def _index_members(self, kept: torch.Tensor) -> None:
        self.slices.clear()
        self._split_heads = None
        self._index = self.layout.member_indices(kept)

    @torch.compiler.disable
    def read_hidden(self, h: torch.Tensor) -> None:
        """The down projection's input ``h`` (every channel's output), each time a block that
        draws at its output runs sparse: a draw waiting for this forward's activations is made from
        them, else (a later micro-batch, a checkpoint's recompute) they refresh the statistics
        (:meth:`BlockScorer.observe`). Outside the graph under ``torch.compile``, so the draw is kept."""
        key = (self.context.draw_id, self.k())
        if self._drawn_for != key:
            self._draw(h, key, hidden=True)
        else:
            self.scorer.observe(h, self.kept_units)

    @torch.compiler.disable
    def read_values(self, out: torch.Tensor) -> None:
        """The value projection's output ``out`` (its base layer's: a fused qkv's whole output), each
        time an attention block that draws in its forward runs sparse: a draw waiting for this
        forward's values is made from every head's values on all real tokens (a checkpoint's
        recompute or a later micro-batch of the same draw changes nothing)."""
        key = (self.context.draw_id, self.k())
        if self._drawn_for != key:
            self._draw(self.scorer.value_rows(out), key, hidden=True)


def _input_forward(unit: BlockUnit, proj: nn.Module, dense: Callable, x: torch.Tensor) -> torch.Tensor:
    idx = unit.input_index(proj, x)  # None: the block runs dense
    out = _sliced(unit, proj, dense, x, idx, KEEP_OUTPUTS)
    values = unit.scorer.values
    if idx is not None and values is not None and proj is values[0]:
        unit.read_values(out)
    return out


def _output_forward(unit: BlockUnit, proj: nn.Module, dense: Callable, h: torch.Tensor) -> torch.Tensor:
    if unit.scorer.observes and proj is unit.output and unit._row_set != "dense" and unit.is_sparse():
        if unit.scorer.draws_in_forward:
            unit.read_hidden(h)
        else:
            unit.scorer.observe(h, unit.kept_units)
    idx = unit.output_index(proj)
    if idx is not None and unit.context.config.rescale == "inverse_keep":  # EST: kept outputs scaled as in dropout
        h = h * (unit.n / unit.k())
    out = _sliced(unit, proj, dense, h, idx, KEEP_INPUTS)
    if idx is not None and unit.compensation is not None and proj is unit.output:
        out = out + unit.compensation.to(out.dtype)
    return out


def _split_block_forward(unit: BlockUnit, own: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The MLP block's forward under ``sparse_tokens: context`` with a sliced forward: the loss rows through the
    block's own forward with every channel, the context rows through the same forward with the kept channels
    only, each a contiguous batch, so every projection, the activation and the product run on one row set at
    its own width; one gather per row set at the block's entry, one scatter at its exit."""
    rows = unit.prepare_split(x)
    if rows is None:
        return own(x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    parts = []
    for row_set, index in zip(("dense", "sparse"), rows):
        if index.numel() == 0:
            continue
        if index.numel() == flat.shape[0]:  # the other set is empty: no gather, no scatter
            with unit.rows(row_set, index):
                return own(x, *args, **kwargs)
        with unit.rows(row_set, index):
            parts.append(own(flat.index_select(0, index).unsqueeze(0), *args, **kwargs).squeeze(0))
    out = parts[0].new_empty(flat.shape[0], parts[0].shape[-1])
    out = out.index_copy(0, rows[0], parts[0]).index_copy(0, rows[1], parts[1].to(out.dtype))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _sliced(unit: BlockUnit, proj: nn.Module, dense: Callable, x: torch.Tensor, idx: KeptIndex | None, dim: int) -> torch.Tensor:
    if idx is None:
        return dense(x)
    rows = unit.token_split_for(x)
    if rows is not None:
        if not unit.backward_only:  # a sliced forward splits at the block (_split_block_forward), never here
            raise SATError(f"{unit.name}: its projections ran outside the block's forward, which sparse_tokens context splits")
        return split_rows_linear(proj, x, rows, idx, dim, unit.full_input_grad)
    if unit.backward_only:
        return backward_kept_linear(proj, x, idx, dim, unit.full_input_grad)
    return kept_linear(proj, x, idx, dim, unit.slices, unit.scorer.given_rows(proj, x) if dim == KEEP_OUTPUTS else None)


def _draws_random(cfg) -> bool:
    """Whether a draw uses random numbers (wanda or magnitude with topk do not: no generator)."""
    return cfg.metric in ("uniform", "maxip", "activation") or cfg.selection == "sampling"
