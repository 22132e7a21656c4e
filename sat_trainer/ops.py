"""Sliced linear ops: the one place where omitted neurons are skipped.

Every projection SAT touches is one of two roles:

* an *input* projection (gate/up, q/k/v, c_fc, fc1) computes only its kept **output** features:
  ``F.linear(x, W[idx], b[idx])``;
* the *output* projection (down, o, c_proj, fc2) reads only its kept **input** features:
  ``F.linear(h, W[:, idx], b)``.

The matmuls are smaller dense ones, never a mask over the full computation. Both roles are one
op, :func:`kept_linear`, which takes the module itself, so one function serves ``nn.Linear``
(weight ``(out, in)``) and GPT-2's ``Conv1D`` (weight ``(in, out)``). On the devices in
``KEPT_OP_DEVICES`` (CUDA) it is a custom autograd function; elsewhere (CPU, where that measured
slower) plain ``F.linear`` over ``index_select``, whose backward zero-fills the full weight
gradient and scatters the kept part into it.

What the custom op saves over ``F.linear(x, W.index_select(dim, idx))`` through autograd:

* the kept slice is gathered once per kept set (:class:`SliceCache`) and reused by the other
  micro-batches of the step and by gradient-checkpoint recompute, instead of once per call;
* backward computes only the kept slice's weight gradient and writes it with a non-atomic
  ``index_copy_`` (``index_select``'s backward is an atomic ``index_add_``), and in a single
  process adds it straight into ``.grad``: a full-size zero-filled gradient is made once per
  step (when ``.grad`` is None), not once per call plus an addition.

An input projection's kept outputs on some token rows may be known already: the ``activation``
metric's scoring subsample computed every output feature on them (:class:`GivenRows`). The op
then computes only the other rows and takes the given ones' kept features; its backward is
unchanged (the gradient of the kept slice over every row), so the step is exactly the one it
replaces, less one kept-width matmul over the subsample.

Omitted rows/columns always end with exactly zero gradient, as with ``index_select``. Under
``torch.distributed`` (DDP and FSDP reduce gradients from hooks on autograd's gradient
accumulation, which a hand-written ``.grad`` would bypass) and while ``torch.compile`` traces
(``.grad`` is not traceable), the op returns the full-size gradient to autograd instead and does
not cache slices (FSDP re-gathers parameters into the same storage each forward, so a cache
could not tell a stale slice).

:func:`backward_kept_linear` is the op of ``omit_in: backward`` and ``weight_gradient``: the
forward runs with the full weight (the loss is the dense model's) and the backward computes only
the kept slices' weight gradients, with the input gradient through the kept features only
(``backward``: omitted units' backward paths are cut) or dense (``weight_gradient``).
:func:`split_rows_linear` splits the backward of a dense forward's token rows (``sparse_tokens: context``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

SLICEABLE = (nn.Linear, Conv1D)
KEEP_OUTPUTS, KEEP_INPUTS = 0, 1  # the out-major weight dim that is sliced
# Devices where the custom op runs; elsewhere autograd's index_select path (on the CPU the op's Python
# forward/backward costs more than the zero-filled scatter it saves; docs/journal/ has the record).
KEPT_OP_DEVICES = ("cuda",)
# kept features: a tensor, or (the dense-forward ops' input projections) a callable read in backward
KeptIndex = torch.Tensor | Callable[[], torch.Tensor]


def is_sliceable(module: nn.Module) -> bool:
    """Plain dense projections only: subclasses (quantised, LoRA-wrapped, ...) are not assumed to slice."""
    return type(module) in SLICEABLE


def out_major_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an ``(out_features, in_features)`` view, whatever the layer's storage layout."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of the full weight, also where it is not in memory: a
    DeepSpeed ZeRO-3 parameter outside its module's forward is an empty shard whose real shape is
    ``ds_shape`` (a model built under ``zero.Init``, as ``from_pretrained`` does, is patched so)."""
    shape = tuple(getattr(module.weight, "ds_shape", module.weight.shape))
    return (shape[1], shape[0]) if isinstance(module, Conv1D) else (shape[0], shape[1])


def weight_numel(module: nn.Module) -> int:
    """Elements of the full weight (ZeRO-3 shards included, see :func:`weight_shape`)."""
    out_f, in_f = weight_shape(module)
    return out_f * in_f


def out_features(module: nn.Module) -> int:
    return weight_shape(module)[0]


def in_features(module: nn.Module) -> int:
    return weight_shape(module)[1]


@dataclass
class _Slice:
    idx: torch.Tensor
    version: int
    dtype: torch.dtype
    weight: torch.Tensor
    bias: torch.Tensor | None


class SliceCache:
    """Kept weight (and bias) slices per module, valid while the kept indices, the weight's
    in-place version (an optimizer step bumps it) and the compute dtype stay the same."""

    def __init__(self) -> None:
        self._slices: dict[nn.Module, _Slice] = {}

    def clear(self) -> None:
        self._slices.clear()

    def get(self, module: nn.Module, idx: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        hit = self._slices.get(module)
        if hit is None or hit.idx is not idx or hit.version != module.weight._version or hit.dtype != dtype:
            hit = _Slice(idx, module.weight._version, dtype, *_gather(module, idx, dim, dtype))
            self._slices[module] = hit
        return hit.weight, hit.bias


def _gather(module: nn.Module, idx: torch.Tensor, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept out-major weight slice and kept bias entries (kept outputs only: the output side
    adds the whole bias), detached, in ``dtype``."""
    with torch.no_grad():
        weight = _as(out_major_weight(module).index_select(dim, idx), dtype)
        bias = None
        if module.bias is not None and dim == KEEP_OUTPUTS:
            bias = _as(module.bias.index_select(0, idx), dtype)
    return weight, bias


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the call when it would do nothing: this op runs several times
    per block per step, and on a GPU the host's per-op time can show in the step time."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


@dataclass(frozen=True)
class GivenRows:
    """Token rows of an input projection's output that were computed already: ``full`` holds the
    module's every output feature on the flattened rows ``rows`` of its input (None: on all of
    them), ``other`` the remaining rows, which the op computes. ``full`` None: nothing is given
    this call (a later micro-batch, a checkpoint's recompute), and the op computes every row
    through the same autograd function, so a recompute saves the tensors its forward saved."""

    rows: torch.Tensor | None = None
    other: torch.Tensor | None = None
    full: torch.Tensor | None = None

    def kept(self, idx: torch.Tensor) -> torch.Tensor | None:
        """The given rows' kept output features ``idx``."""
        return None if self.full is None else self.full.index_select(1, idx)


def kept_linear(
    module: nn.Module,
    x: torch.Tensor,
    idx: torch.Tensor,
    dim: int,
    cache: SliceCache | None,
    given: GivenRows | None = None,
) -> torch.Tensor:
    """``module(x)`` restricted to kept features ``idx``: its kept outputs (``dim=KEEP_OUTPUTS``),
    or, with ``x`` holding only the kept inputs (``dim=KEEP_INPUTS``), the full output. ``given``
    (kept outputs only): rows of the output known already, see :class:`GivenRows`."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else module.weight.dtype
    rows = () if given is None else (given.rows, given.other, given.kept(idx))
    if device not in KEPT_OP_DEVICES:
        bias = module.bias.index_select(0, idx) if module.bias is not None and dim == KEEP_OUTPUTS else module.bias
        weight = out_major_weight(module).index_select(dim, idx)
        if given is None:
            return F.linear(x, weight, bias)
        # cast outside the op (differentiably), as the dense-forward ops do: its backward runs without autocast
        return _GivenRowsLinear.apply(_as(x, dtype), _as(weight, dtype), None if bias is None else _as(bias, dtype), *rows)
    compiling = torch.compiler.is_compiling()
    direct = not compiling and not (dist.is_available() and dist.is_initialized())
    if direct and cache is not None:
        weight, bias = cache.get(module, idx, dim, dtype)
    else:
        weight, bias = _gather(module, idx, dim, dtype)
    return _KeptLinear.apply(
        _as(x, dtype), weight, bias, module.weight, module.bias, idx, dim, isinstance(module, Conv1D), direct, *rows
    )


def _linear_given_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    rows: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, w, b)`` with the flattened rows ``rows`` (None: all) taken from ``values``
    instead of computed (none given: ``values`` None)."""
    if values is None:
        return F.linear(x, w, b)
    out_shape = (*x.shape[:-1], w.shape[0])
    if rows is None:
        return values.to(x.dtype).reshape(out_shape)
    flat = x.reshape(-1, x.shape[-1])
    computed = F.linear(flat.index_select(0, other), w, b)
    out = computed.new_empty(flat.shape[0], w.shape[0]).index_copy_(0, other, computed)
    return out.index_copy_(0, rows, values.to(computed.dtype)).reshape(out_shape)


class _GivenRowsLinear(torch.autograd.Function):
    """``F.linear(x, w, b)``, some of whose output rows were given (:func:`_linear_given_rows`);
    the backward is the linear's over every row. The CPU path of :class:`GivenRows` (``w``, ``b``
    the kept slices, gathered through autograd as the plain CPU path gathers them)."""

    @staticmethod
    def forward(ctx, x, w, b, rows, other, values):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _linear_given_rows(x, w, b, rows, other, values)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ w if ctx.needs_input_grad[0] else None
        grad_w = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None


class _KeptLinear(torch.autograd.Function):
    """``F.linear(x, w_kept, b_kept)`` whose parameter gradients land in the kept slice only.

    ``param_w``/``param_b`` are the module's parameters, passed so that autograd routes their
    gradient here; ``w_kept``/``b_kept`` are their detached kept slices, used for the matmul.
    """

    @staticmethod
    def forward(ctx, x, w_kept, b_kept, param_w, param_b, idx, dim, transposed, direct, rows=None, other=None, values=None):
        ctx.save_for_backward(x, w_kept, idx)
        ctx.dim, ctx.transposed, ctx.direct = dim, transposed, direct
        ctx.params = (param_w, param_b) if direct else (None, None)
        ctx.like = (_meta(param_w), _meta(param_b))
        if dim == KEEP_INPUTS and param_b is not None:
            b_kept = _as(param_b, x.dtype)
        # all in the compute dtype already: autocast casts nothing
        return _linear_given_rows(x, w_kept, b_kept, rows, other, values)

    @staticmethod
    def backward(ctx, grad):
        x, w_kept, idx = ctx.saved_tensors
        grad_x = grad @ w_kept if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_b = None
        if ctx.needs_input_grad[3]:
            kept_w = g2.t() @ x.reshape(-1, x.shape[-1])  # out-major (kept rows or kept columns)
            grad_w = _place(ctx, 0, kept_w, idx, ctx.dim, ctx.transposed)
        if ctx.needs_input_grad[4]:
            if ctx.dim == KEEP_OUTPUTS:
                grad_b = _place(ctx, 1, g2.sum(0), idx, 0, False)
            else:  # the output side adds the whole bias: its gradient is full-size anyway
                grad_b = g2.sum(0)
        return grad_x, None, None, grad_w, grad_b, None, None, None, None, None, None, None


def _place(ctx, which: int, kept: torch.Tensor, idx: torch.Tensor, dim: int, transposed: bool) -> torch.Tensor | None:
    """Put a kept-slice gradient into the full parameter gradient: added into ``param.grad``
    (direct; returns None so autograd adds nothing), or as a new full-size zero-filled tensor."""
    param = ctx.params[which]
    if ctx.direct:
        kept = kept.to(param.dtype)
        if param.grad is None:
            param.grad = torch.zeros_like(param, memory_format=torch.contiguous_format)
            _out_major(param.grad, transposed).index_copy_(dim, idx, kept)
        else:
            _out_major(param.grad, transposed).index_add_(dim, idx, kept)
        return None
    shape, dtype = ctx.like[which]
    full = kept.new_zeros(shape, dtype=dtype)
    _out_major(full, transposed).index_copy_(dim, idx, kept)
    return full


def _meta(param: torch.Tensor | None) -> tuple[torch.Size, torch.dtype] | None:
    return None if param is None else (param.shape, param.dtype)


def _out_major(tensor: torch.Tensor, transposed: bool) -> torch.Tensor:
    return tensor.t() if transposed else tensor


def backward_kept_linear(
    module: nn.Module, x: torch.Tensor, idx: KeptIndex, dim: int, full_input_grad: bool = False
) -> torch.Tensor:
    """``module(x)`` with the full weight forward, and a backward through kept features ``idx`` only.

    ``dim=KEEP_OUTPUTS`` (input projections): only the kept outputs' gradient is read; the kept
    rows get weight gradients, and ``dX`` comes from the kept rows alone. ``dim=KEEP_INPUTS``
    (output projections): ``dX`` is zero on the omitted inputs, only the kept columns get weight
    gradients, and only the kept inputs are saved for backward (the omitted ones' activations
    are not kept alive). The backward's matmuls are the kept-size ones, about 2/3 of what
    forward-and-backward omission saves at the same rate. With ``full_input_grad`` (``omit_in:
    weight_gradient``) ``dX`` is the dense one and only the weight gradient is restricted to the
    kept slice (1/3 of the saving). Under autocast the operands are cast
    outside the op (a differentiable cast), so one path serves every dtype, distributed wrapper
    and ``torch.compile``: the full-size weight gradient goes back to autograd, zero outside the
    kept slice. ``idx`` may be a callable, read in backward (an input projection's kept set drawn
    after its forward, from the block's own activations: :meth:`BlockUnit.read_hidden`).
    """
    return _BackwardKeptLinear.apply(*_dense_operands(module, x), idx, dim, full_input_grad)


def _dense_operands(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(x, out-major weight, bias)`` in the compute dtype (autocast's, else the weight's): the
    operands of the ops whose forward is the dense one, cast outside them (differentiably)."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else module.weight.dtype
    bias = None if module.bias is None else _as(module.bias, dtype)
    return _as(x, dtype), _as(out_major_weight(module), dtype), bias


class _BackwardKeptLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` forward; backward restricted to the kept slice ``idx`` along ``dim``."""

    @staticmethod
    def forward(ctx, x, w, b, idx, dim, full_input_grad):
        ctx.dim, ctx.x_shape, ctx.has_bias, ctx.full_input_grad = dim, x.shape, b is not None, full_input_grad
        saved_x = x if dim == KEEP_OUTPUTS else _columns(x, idx)  # an output projection's idx is a tensor
        ctx.save_for_backward(saved_x, w, *_save_kept_index(ctx, idx))
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w, *rest = ctx.saved_tensors
        idx = _saved_kept_index(ctx, rest)
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] and ctx.full_input_grad:
            grad_x = (g2 @ w).reshape(ctx.x_shape)
        if ctx.dim == KEEP_OUTPUTS:
            g_kept = _columns(g2, idx)
            if ctx.needs_input_grad[0] and not ctx.full_input_grad:
                grad_x = (g_kept @ w.index_select(0, idx)).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                grad_w = w.new_zeros(w.shape).index_copy_(0, idx, g_kept.t() @ x2)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g2.new_zeros(w.shape[0]).index_copy_(0, idx, g_kept.sum(0))
        else:
            if ctx.needs_input_grad[0] and not ctx.full_input_grad:
                grad_x = _with_columns(g2 @ _columns(w, idx), idx, w.shape[1]).reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                grad_w = _with_columns(g2.t() @ x2, idx, w.shape[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


def _columns(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t.index_select(-1, idx)``, the columns ``idx``, selected from ``t`` flattened to 2-D:
    on the CPU ``index_select`` along the last dim of a 3-D tensor is slower than on the same data
    as a matrix."""
    flat = t.reshape(-1, t.shape[-1]).index_select(1, idx)
    return flat.reshape(*t.shape[:-1], idx.numel())


def _with_columns(values: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
    """A zero-filled tensor ``width`` columns wide holding ``values`` in the columns ``idx`` (unique).
    On the CPU through ``scatter_`` over an expanded index, which is faster there than ``index_copy_``
    along the last dim; elsewhere ``index_copy_``."""
    out = values.new_zeros(*values.shape[:-1], width)
    if values.device.type != "cpu":
        return out.index_copy_(-1, idx, values)
    return out.scatter_(-1, idx.expand_as(values), values)


def _save_kept_index(ctx, idx: KeptIndex) -> tuple[torch.Tensor, ...]:
    """Keep a dense-forward op's kept features for its backward: a tensor is returned to be saved
    with the others; a callable (a kept set drawn after this forward) is kept on ``ctx`` and
    called when backward runs."""
    ctx.index_later = idx if callable(idx) else None
    return () if callable(idx) else (idx,)


def _saved_kept_index(ctx, saved: list[torch.Tensor]) -> torch.Tensor:
    """The kept features :func:`_save_kept_index` kept: read now, in backward."""
    return ctx.index_later() if ctx.index_later is not None else saved[0]


def split_rows_linear(
    module: nn.Module, x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], idx: KeptIndex, dim: int, full_input_grad: bool
) -> torch.Tensor:
    """``sparse_tokens: context`` with a dense forward (``omit_in: backward`` or ``weight_gradient``): one dense
    matmul over every row (no gathers, no scatter: it is the dense forward); only the backward splits the rows,
    the flattened token rows ``rows[0]`` passing their whole gradient and ``rows[1]`` their kept slice's, see
    :class:`_SplitBackwardLinear`. (With a sliced forward the split is the MLP block's, not a projection's:
    :mod:`sat_trainer.patch.units`.)"""
    return _SplitBackwardLinear.apply(*_dense_operands(module, x), rows, idx, dim, full_input_grad)


class _SplitBackwardLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` forward over all token rows; a backward in which the dense rows
    pass their whole gradient and the sparse rows only their kept slice's (``backward`` and
    ``weight_gradient`` under ``sparse_tokens: context``).

    The rows are gathered once each in backward, where the kept-size matmuls save FLOPs; the
    forward is the dense one. The input is saved whole, as the dense layer saves it (the dense
    rows need all of it).
    """

    @staticmethod
    def forward(ctx, x, w, b, rows, idx, dim, full_input_grad):
        ctx.dim, ctx.x_shape, ctx.has_bias, ctx.full_input_grad = dim, x.shape, b is not None, full_input_grad
        ctx.save_for_backward(x, w, *rows, *_save_kept_index(ctx, idx))
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w, dense_rows, sparse_rows, *rest = ctx.saved_tensors
        idx = _saved_kept_index(ctx, rest)
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        g_dense, x_dense = g2.index_select(0, dense_rows), x2.index_select(0, dense_rows)
        g_sparse, x_sparse = g2.index_select(0, sparse_rows), x2.index_select(0, sparse_rows)
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        split_x = ctx.needs_input_grad[0] and not ctx.full_input_grad
        grad_x = (g2 @ w).reshape(ctx.x_shape) if ctx.needs_input_grad[0] and ctx.full_input_grad else None
        grad_w = grad_b = sparse_x = None
        if ctx.dim == KEEP_OUTPUTS:  # sparse rows: only the kept outputs' gradient is read
            g_kept = _columns(g_sparse, idx)
            if split_x:
                sparse_x = g_kept @ w.index_select(0, idx)
            if need_w:
                grad_w = (g_dense.t() @ x_dense).index_add_(0, idx, g_kept.t() @ x_sparse)
            if need_b:
                grad_b = g_dense.sum(0).index_add_(0, idx, g_kept.sum(0))
        else:  # sparse rows: only the kept inputs get (and pass on) gradient
            if split_x:
                sparse_x = _with_columns(g_sparse @ _columns(w, idx), idx, w.shape[1])
            if need_w:
                grad_w = (g_dense.t() @ x_dense).index_add_(1, idx, g_sparse.t() @ _columns(x_sparse, idx))
            if need_b:
                grad_b = g2.sum(0)
        if split_x:
            grad_x = g2.new_empty(g2.shape[0], w.shape[1])
            grad_x = grad_x.index_copy_(0, dense_rows, g_dense @ w).index_copy_(0, sparse_rows, sparse_x).reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, None, None, None, None
