"""The masked dense reference of DESIGN invariant 1: the unpatched model with the omitted
channels' activations (heads' outputs) set to zero at the input of each block's output projection
(``omit_in: backward``: left in the forward, cut from the backward), the kept ones scaled by
units / kept units under ``rescale: inverse_keep``, and each decoder layer a draw skips
(``targets`` with layers) replaced by the identity."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sat_trainer.ops import SLICEABLE, Conv1D, in_features, out_major_weight
from sat_trainer.patch.blocks import layer_index


def feature_mask(unit) -> torch.Tensor:
    """1 on the output projection's kept input features of ``unit``'s current draw, else 0."""
    mask = torch.zeros(out_major_weight(unit.output).shape[1])
    mask[unit.output_index(unit.output)] = 1.0
    return mask


@contextlib.contextmanager
def masked(reference: nn.Module, handle):
    """The reference of ``handle``'s current draw, in ``reference`` (an unpatched copy).

    ``omit_in: forward_backward``: every input feature the units omit is zeroed at the output
    projection. ``omit_in: backward``: the forward stays dense and the omitted units' backward
    paths are cut: at the output projection the omitted features pass no gradient back
    (``h * mask + (h * (1 - mask)).detach()``) and its weights' omitted columns (the base layer's
    and LoRA's ``lora_A``) get none. Weights that read the projection's output (LoRA's ``lora_B``,
    the bias) get the dense forward's gradient. ``sparse_tokens: context`` (the handle's split of
    its last forward): the mask applies to the sparse token rows only; its backward-only form is
    ``f(h * mask) + (f(h) - f(h * mask)).detach()`` for each layer ``f`` that reads the features
    (the base layer and ``lora_A``; ``lora_B`` reads ``lora_A``'s dense output). ``rescale:
    inverse_keep`` (forward_backward only): the kept features are multiplied by n / k. A decoder
    layer the draw skips returns its input (it still runs: its output is discarded, so its
    parameters get no gradient), and its blocks get no mask.
    """
    modules = dict(reference.named_modules())
    backward_only = handle.config.omit_in == "backward"
    skipped = set(handle.skipped_layers())
    hooks = [
        _module(modules, name).register_forward_hook(_identity, with_kwargs=True)
        for index, name, _ in (handle.layers.layers if skipped else [])
        if index in skipped
    ]
    for unit in handle.units:
        if layer_index(unit.name) in skipped:
            continue
        mask, split = _mask_of(unit, handle)
        if handle.config.rescale == "inverse_keep":
            mask = mask * (unit.n / unit.k())
        out_name = unit.shape.output  # the block's attribute: a plain layer or its LoRA wrapper
        # the reference may be wrapped (e.g. a PeftModel) where the handle's model was not
        target = _unit_module(modules, unit, out_name)
        if handle.config.omit_in == "weight_gradient":
            hooks += _weight_gradient_hooks(modules, unit, target, mask)
            continue
        if not backward_only:
            hooks.append(target.register_forward_pre_hook(lambda mod, args, mask=mask: (args[0] * _shaped(mask, args[0]),)))
            continue
        if split:  # every layer that reads the features: the base layer and LoRA's lora_A, not lora_B
            for layer in target.modules():
                if isinstance(layer, SLICEABLE) and in_features(layer) == mask.shape[-1]:
                    hooks.append(
                        layer.register_forward_hook(lambda mod, args, out, mask=mask: _cut_rows(mod, args[0], out, mask))
                    )
            continue
        hooks.append(
            target.register_forward_pre_hook(lambda mod, args, mask=mask: (args[0] * mask + (args[0] * (1 - mask)).detach(),))
        )
        for layer in target.modules():
            if isinstance(layer, SLICEABLE) and in_features(layer) == mask.numel() and layer.weight.requires_grad:
                column_mask = mask.unsqueeze(1) if isinstance(layer, Conv1D) else mask  # Conv1D stores (in, out)
                hooks.append(layer.weight.register_hook(lambda grad, m=column_mask: grad * m))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _unit_module(modules: dict, unit, attr: str) -> nn.Module:
    return _module(modules, f"{unit.name}.{attr}" if unit.name else attr)


def _module(modules: dict, path: str) -> nn.Module:
    (found,) = [m for n, m in modules.items() if n == path or n.endswith("." + path)]
    return found


def _identity(module: nn.Module, args: tuple, kwargs: dict, out):
    """A skipped decoder layer's output: its hidden-state input."""
    return args[0] if args else kwargs["hidden_states"]


def _weight_gradient_hooks(modules: dict, unit, target: nn.Module, mask: torch.Tensor) -> list:
    """``omit_in: weight_gradient``: dense forward and input gradients; the omitted units' weight
    gradients zeroed: columns of the output projection's layers, rows (and bias entries) of the
    sliced input projections' layers (LoRA's lora_B included)."""
    per_unit = mask.reshape(unit.n, -1)[:, 0]
    hooks = []
    sliced = unit.shape.inputs[:1] if unit.query_heads else unit.shape.inputs
    for attr, side in [(a, "rows") for a in sliced] + [(unit.shape.output, "columns")]:
        module = target if side == "columns" else _unit_module(modules, unit, attr)
        skip = "lora_A" if side == "rows" else "lora_B"  # the LoRA factor on the unsliced side of the projection
        for name, layer in module.named_modules():
            if not isinstance(layer, SLICEABLE) or not layer.weight.requires_grad or skip in name:
                continue
            features = in_features(layer) if side == "columns" else out_major_weight(layer).shape[0]
            if features % unit.n or (side == "columns" and features != mask.numel()):
                continue
            m = _row_mask(unit, modules, per_unit, features) if side == "rows" else per_unit.repeat_interleave(features // unit.n)
            along_in = side == "columns"
            shaped = m if along_in != isinstance(layer, Conv1D) else m.unsqueeze(1)  # Conv1D stores (in, out)
            hooks.append(layer.weight.register_hook(lambda grad, s=shaped: grad * s))
            if side == "rows" and layer.bias is not None:
                hooks.append(layer.bias.register_hook(lambda grad, s=m: grad * s))
    return hooks


def _row_mask(unit, modules: dict, per_unit: torch.Tensor, features: int) -> torch.Tensor:
    """The kept-row mask of an input projection with ``features`` rows: per unit, over each of its
    segments (a fused input: [gate | up], or [q | k | v] sized by the reference block's own head
    counts). query_head units omit query heads only: a fused k and v are kept whole."""
    segments = unit.shape.fused
    if not segments:
        sizes = [features]
    elif segments[0].heads is None:
        sizes = [features // len(segments)] * len(segments)
    else:
        (block,) = [m for n, m in modules.items() if n == unit.name or n.endswith("." + unit.name)]  # unpatched: dense counts
        sizes = [_attribute(block, s.heads) * block.head_dim for s in segments]
    assert sum(sizes) == features, (unit.name, sizes, features)
    masks = [
        per_unit.repeat_interleave(size // unit.n) if i == 0 or not unit.query_heads else torch.ones(size)
        for i, size in enumerate(sizes)
    ]
    return torch.cat(masks)


def _attribute(obj, path: str) -> int:
    for attr in path.split("."):
        obj = getattr(obj, attr)
    return int(obj)


def _mask_of(unit, handle) -> tuple[torch.Tensor, bool]:
    """The feature mask, and under a token split a (tokens, features) one: all kept on the dense rows."""
    mask = feature_mask(unit)
    split = handle.token_split if unit.kind == "mlp" else None
    if split is None:
        return mask, False
    rows = torch.ones(split[0].numel() + split[1].numel(), mask.numel())
    rows[split[1]] = mask
    return rows, True


def _shaped(mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return mask.reshape(h.shape) if mask.dim() == 2 else mask


def _cut_rows(module: nn.Module, h: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    kept = module.forward(h * _shaped(mask, h))  # .forward: this hook does not run again
    return kept + (out - kept).detach()


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads
