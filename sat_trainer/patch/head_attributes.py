"""The head-count attributes an attention block's own forward reads, set to the kept counts while it runs sliced.

Two kinds of attribute size what a block's unchanged forward does with its q/k/v:

* ``num_key_value_groups``: the eager (and non-GQA sdpa) forward repeats each KV head for that
  many query heads. ``attention_unit: query_head`` keeps the same number of query heads in every
  KV group, so while sliced it must read the kept count per group.
* the head counts a fused attention block splits its fused ``qkv`` output by (registry
  ``Segment.heads``; Phi-3: ``config.num_attention_heads``, ``num_key_value_heads``). Their dense
  values size the segments; while sliced they must read the kept counts, or the block would split
  ``[q_kept | k_kept | v_kept]`` at the dense offsets.

Both are set on the block instance only: a plain attribute directly, a dotted one (``config.x``)
on a shallow copy of the object it lives in, so the model's shared config (read by every other
layer, saved with the model) is never written. :meth:`HeadAttributes.set_dense` puts the block's
own values back (dense forward, eval, ``remove_sat``).
"""

from __future__ import annotations

import copy

from torch import nn

from ..errors import SATError
from .registry import BlockShape


class HeadAttributes:
    """The head-count attributes of one block (see the module docstring).

    Copies of the objects holding dotted attributes are made once per kept count (a new object
    per step would make ``torch.compile`` guard on a new config each step) and dropped with the
    block's draws (:meth:`forget_copies`).
    """

    def __init__(self, name: str, block: nn.Module, shape: BlockShape, query_heads: bool):
        self.name, self.block, self.shape = name, block, shape
        self.paths = list(dict.fromkeys(s.heads for s in shape.fused if s.heads is not None))
        self.dense = {p: _read_path(name, block, p) for p in self.paths}
        self._originals = {root: getattr(block, root) for root in {p.split(".")[0] for p in self.paths}}
        self._copies: dict[tuple[int, ...], dict[str, object]] = {}
        # query_head units change the GQA repeat count while sliced; the block's own value, put back when dense
        self._kv_groups = getattr(block, "num_key_value_groups", None) if query_heads else None

    def segment_sizes(self, features: int) -> list[int]:
        """Output rows of each segment of the fused input projection, which has ``features``."""
        segments = self.shape.fused
        if not self.paths:  # equal shares ([gate | up])
            if features % len(segments):
                raise SATError(
                    f"{self.name}: fused {self.shape.inputs[0]} has {features} output features, not {len(segments)} equal parts"
                )
            return [features // len(segments)] * len(segments)
        dim = head_dim(self.name, self.block)
        sizes = [self.dense[s.heads] * dim for s in segments]
        if sum(sizes) != features:
            described = " + ".join(f"{s.name}: {s.heads}={self.dense[s.heads]} x head_dim {dim}" for s in segments)
            raise SATError(
                f"{self.name}: fused {self.shape.inputs[0]} has {features} output features, but its segments ({described}) sum to {sum(sizes)}"
            )
        return sizes

    def set_sliced(self, query_heads_per_group: int, kept_rows: list[int]) -> None:
        """While sliced: the GQA repeat count reads ``query_heads_per_group`` (query_head units) and each
        fused segment's head count reads its ``kept_rows``' (rows of each segment the sliced forward computes)."""
        self._set_query_heads_per_group(query_heads_per_group)
        if not self.paths:
            return
        counts = self._kept_counts(kept_rows)
        key = tuple(counts[p] for p in self.paths)
        if key not in self._copies:
            self._copies[key] = self._replaced_roots(counts)
        for root, value in self._copies[key].items():
            setattr(self.block, root, value)

    def set_dense(self) -> None:
        """The block's own values back."""
        self._set_query_heads_per_group(None)
        for root, original in self._originals.items():
            if self.block.__dict__.get(root) is not original:
                setattr(self.block, root, original)

    def forget_copies(self) -> None:
        self._copies.clear()

    def _set_query_heads_per_group(self, kept_per_group: int | None) -> None:
        if self._kv_groups is not None:
            self.block.num_key_value_groups = kept_per_group or self._kv_groups

    def _kept_counts(self, kept_rows: list[int]) -> dict[str, int]:
        dim = head_dim(self.name, self.block)
        counts: dict[str, int] = {}
        for segment, rows in zip(self.shape.fused, kept_rows):
            if counts.setdefault(segment.heads, rows // dim) != rows // dim:
                raise SATError(f"{self.name}: segments sharing {segment.heads!r} would keep different head counts")
        return counts

    def _replaced_roots(self, counts: dict[str, int]) -> dict[str, object]:
        """{root attribute: its value with the kept counts}: an int, or a shallow copy of the original object."""
        roots: dict[str, object] = dict(self._originals)
        for path, count in counts.items():
            root, *rest = path.split(".")
            roots[root] = _with_attribute(roots[root], rest, count) if rest else count
        return roots


def head_dim(name: str, block: nn.Module) -> int:
    """The attention block's ``head_dim`` attribute; raises naming the block if it has no positive integer one."""
    value = getattr(block, "head_dim", None)
    if not isinstance(value, int) or value <= 0:
        raise SATError(f"{name}: attention module has no integer 'head_dim' attribute; cannot find its heads")
    return value


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
    first, *rest = path
    setattr(new, first, _with_attribute(getattr(obj, first), rest, value) if rest else value)
    return new
