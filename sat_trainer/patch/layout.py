"""Where a block's units live in its projections: members, fused segments, unit counts, feature indices.

A block's *units* (MLP channels, attention KV groups or query heads) are kept or omitted
together. Each unit owns contiguous output features of every input projection and the same
input features of the output projection. The *members* are every layer whose forward SAT
patches: the base layers plus, under PEFT LoRA, each adapter's ``lora_B`` on the input side and
``lora_A`` on the output side (see :mod:`sat_trainer.adapters`).

A fused input projection (registry ``BlockShape.fused``) is laid out in *parts*, one per segment
(gate, up; q, k, v), each sliced per unit like an unfused input, so its kept output is each
segment's kept rows, segment after segment (``[gate_kept | up_kept]``, ``[q_kept | k_kept | v_kept]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import adapters
from ..errors import SATError
from ..ops import Conv1D, in_features, out_features, out_major_weight
from .head_attributes import HeadAttributes, head_dim
from .registry import BlockShape


@dataclass(frozen=True)
class Part:
    """``size`` features of a member's sliced dim from ``start`` (one segment of a fused input, or
    all of them): each of the ``n`` units owns ``size // n`` contiguous ones, or, not ``sliced``
    (a fused qkv's k and v under query_head units), the part is kept whole."""

    start: int
    size: int
    sliced: bool = True


class BlockLayout:
    """A block's projections resolved (plain or LoRA-wrapped) and its units' place in each.

    ``fallback`` is why the block cannot be sliced (it then has no units), else None.
    ``inputs``/``output`` are the base layers that are scored and sliced; ``logical`` the logical
    input projections (gate, up; q, k, v) as (base layer, its rows), a fused one's segments each.
    ``n`` units split into ``groups`` equal groups (query_head units: one per KV group), each
    unit ``heads_per_unit`` query heads (attention) wide.
    """

    def __init__(self, name: str, shape: BlockShape, block: nn.Module, query_heads: bool, heads: HeadAttributes):
        self.name, self.shape, self.query_heads = name, shape, query_heads
        attrs = (*shape.inputs, shape.output)
        projections = {a: adapters.resolve(f"{name}.{a}", getattr(block, a)) for a in attrs}
        self.signature = tuple(p.signature for p in projections.values())
        self.fallback = adapters.unsliceable_reason(projections)
        # query_head units slice q only (k and v stay dense); v still scores them (metric activation)
        ins = [projections[a] for a in (shape.inputs[:1] if query_heads else shape.inputs)]
        out = projections[shape.output]
        self.inputs = [p.base for p in ins]
        self.output = out.base
        self.in_members = self.inputs + [m for p in ins for m in p.lora_out]
        self.out_members = [out.base, *out.lora_in]
        self.n, self.heads_per_unit, self.groups = 0, 1, 1
        self.logical: list[tuple[nn.Module, Part]] = []
        self.parts: tuple[Part, ...] = ()  # a fused input's parts: its segments
        if self.fallback is None:
            self.logical = _logical_inputs(shape, [projections[a].base for a in shape.inputs], heads)
            sizes = [part.size for _, part in self.logical]
            self.n, self.heads_per_unit, self.groups = _unit_counts(name, shape, block, sizes, query_heads)
            # query_head units slice q only, so a fused qkv's k and v stay whole
            self.parts = tuple(Part(p.start, p.size, i == 0 or not query_heads) for i, (_, p) in enumerate(self.logical))
            for member, input_side in self.members_with_side():
                for part in self.member_parts(member, input_side)[1]:
                    if part.sliced and part.size % self.n:
                        raise SATError(
                            f"{name}: projection {type(member).__name__} has {part.size} features, not a multiple of {self.n} units"
                        )

    def members(self) -> list[nn.Module]:
        return self.in_members + self.out_members

    def members_with_side(self) -> list[tuple[nn.Module, bool]]:
        """Every member with whether it is on the input side (output features sliced)."""
        return [(m, True) for m in self.in_members] + [(m, False) for m in self.out_members]

    def member_parts(self, member: nn.Module, input_side: bool) -> tuple[int, tuple[Part, ...]]:
        """(sliced weight dim, parts of that dim) of ``member``: a fused input projection (and its
        ``lora_B``, which writes the same rows) holds its segments, any other member one part."""
        dim = _sliced_dim(member, input_side)
        if input_side and self.shape.fused:
            return dim, self.parts
        return dim, (Part(0, out_features(member) if input_side else in_features(member)),)

    def member_indices(self, kept: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """{member: the feature indices of the ``kept`` units along its sliced dim}."""
        return {
            member: feature_index(kept, self.member_parts(member, side)[1], self.n) for member, side in self.members_with_side()
        }

    def kept_rows(self, k: int) -> list[int]:
        """Rows of each fused segment the sliced forward computes with ``k`` units kept."""
        return [part.size // self.n * k if part.sliced else part.size for part in self.parts]

    def logical_weight(self, position: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Out-major weight rows and bias entries (views) of logical input ``position`` (q, k, v: 0, 1, 2)."""
        base, part = self.logical[position]
        rows = slice(part.start, part.start + part.size)
        return out_major_weight(base)[rows], None if base.bias is None else base.bias[rows]

    def sliced_logical_inputs(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Out-major weights and biases of the sliced logical inputs (gate, up; q, k, v; query_head
        units: q only): a fused projection's segments are views of its weight, so every metric
        scores it like separate projections."""
        pairs = [self.logical_weight(i) for i in range(1 if self.query_heads else len(self.logical))]
        return [w for w, _ in pairs], [b for _, b in pairs]

    def outputs_by_member(self, logical: list[torch.Tensor]) -> dict[nn.Module, torch.Tensor]:
        """Each input projection's full-width output, from its logical inputs' (a fused gate_up's
        segments, in its feature order)."""
        parts: dict[nn.Module, list[torch.Tensor]] = {}
        for (base, _), output in zip(self.logical, logical):
            parts.setdefault(base, []).append(output)
        return {base: outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1) for base, outs in parts.items()}

    def unit_gradient_square(self) -> torch.Tensor:
        """Per unit, the squared norm of the gradients its weights hold now (its rows of the input
        members with their bias entries, its columns of the output members), in float32."""
        total = torch.zeros(self.n, device=self.inputs[0].weight.device)
        for member, input_side in self.members_with_side():
            dim, parts = self.member_parts(member, input_side)
            grads = [(member.weight.grad, dim)] + ([(member.bias.grad, 0)] if input_side and member.bias is not None else [])
            for grad, d in grads:
                if grad is not None:
                    per_feature = grad.float().square().sum(dim=1 - d) if grad.dim() == 2 else grad.float().square()
                    for part in parts:
                        if part.sliced:
                            total += per_feature[part.start : part.start + part.size].reshape(self.n, -1).sum(1)
        return total

    def trainable_slices(self, units: torch.Tensor) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
        """(trainable tensor, dim, indices along dim) of ``units``' slices: the rows (outputs) of
        input-side members with their bias entries, the columns (inputs) of output-side members;
        a part that is not sliced is left out."""
        out = []
        for member, input_side in self.members_with_side():
            dim, parts = self.member_parts(member, input_side)
            idx = feature_index(units, parts, self.n, whole_unsliced=False).to(member.weight.device)
            if member.weight.requires_grad:
                out.append((member.weight, dim, idx))
            if input_side and member.bias is not None and member.bias.requires_grad:
                out.append((member.bias, 0, idx))
        return out


def expand(kept: torch.Tensor, chunk: int) -> torch.Tensor:
    """Unit indices -> feature indices, each unit owning ``chunk`` contiguous features."""
    return kept if chunk == 1 else (kept.unsqueeze(1) * chunk + torch.arange(chunk, device=kept.device)).reshape(-1)


def feature_index(units: torch.Tensor, parts: tuple[Part, ...], n: int, whole_unsliced: bool = True) -> torch.Tensor:
    """Unit indices -> feature indices of a member laid out in ``parts``: part after part, so each
    segment's kept features stay contiguous (``[gate_kept | up_kept]``, ``[q_kept | k_kept | v_kept]``)
    for the block's own split; an unsliced part whole (kept features) or not at all (omitted ones)."""
    pieces = []
    for part in parts:
        if part.sliced:
            idx = expand(units, part.size // n)
            pieces.append(idx + part.start if part.start else idx)
        elif whole_unsliced:
            pieces.append(torch.arange(part.start, part.start + part.size, device=units.device))
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else units.new_empty(0)


def _logical_inputs(shape: BlockShape, bases: list[nn.Module], heads: HeadAttributes) -> list[tuple[nn.Module, Part]]:
    """The block's logical input projections (gate, up; q, k, v) as (base layer, its rows): each
    unfused input whole, or each segment of the fused one."""
    if not shape.fused:
        return [(base, Part(0, out_features(base))) for base in bases]
    (base,) = bases
    sizes = heads.segment_sizes(out_features(base))
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(base, Part(start, size)) for start, size in zip(starts, sizes)]


def _sliced_dim(member: nn.Module, input_side: bool) -> int:
    """The weight dim SAT slices: outputs on the input side, inputs on the output side (Conv1D stores ``(in, out)``)."""
    conv = isinstance(member, Conv1D)
    return (1 if conv else 0) if input_side else (0 if conv else 1)


def _unit_counts(name: str, shape: BlockShape, block: nn.Module, sizes: list[int], query_heads: bool) -> tuple[int, int, int]:
    """(number of units, query heads per unit, groups the units split into evenly) from the logical
    inputs' output sizes: channels for MLPs; KV groups for attention (q, k, v), or query heads in
    KV groups for ``attention_unit: query_head``."""
    if shape.kind == "mlp":
        return sizes[0], 1, 1
    dim = head_dim(name, block)
    q_heads = sizes[0] // dim
    kv_heads = sizes[1] // dim
    if kv_heads == 0 or q_heads % kv_heads:
        raise SATError(f"{name}: {q_heads} query heads do not split into {kv_heads} KV groups")
    return (q_heads, 1, kv_heads) if query_heads else (kv_heads, q_heads // kv_heads, 1)
