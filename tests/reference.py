"""The masked dense reference of DESIGN invariant 1: the unpatched model with the omitted
channels' activations (heads' outputs) set to zero at the input of each block's output projection."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sat_trainer.ops import out_major_weight


def feature_mask(unit) -> torch.Tensor:
    """1 on the output projection's kept input features of ``unit``'s current draw, else 0."""
    mask = torch.zeros(out_major_weight(unit.output).shape[1])
    mask[unit.output_index(unit.output)] = 1.0
    return mask


@contextlib.contextmanager
def masked(reference: nn.Module, handle):
    """Zero, in ``reference``, every input feature that ``handle``'s units currently omit."""
    modules = dict(reference.named_modules())
    hooks = []
    for unit in handle.units:
        mask = feature_mask(unit)
        out_name = unit.shape.output  # the block's attribute: a plain layer or its LoRA wrapper
        path = f"{unit.name}.{out_name}" if unit.name else out_name
        # the reference may be wrapped (e.g. a PeftModel) where the handle's model was not
        (target,) = [m for n, m in modules.items() if n == path or n.endswith("." + path)]
        hooks.append(target.register_forward_pre_hook(lambda mod, args, mask=mask: (args[0] * mask,)))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def loss_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads
