"""`router_init: activations`: start each router from the dense model's own per-token expert activations.

A router trained from scratch by the task loss needs far more steps than a fine-tuning run has to learn *which*
experts a token needs (measured: docs/journal/lte_2026-12-07.md). This fits each router, before stage 1, to rank
its experts as the dense model's activations do, so that stage 1 refines a selection that already tracks the
training-free per-token top-k, and stage 2 adapts the model to it.

For each routed MLP and each (non-padding) token of a few training batches, with ``h = act(gate(x)) * up(x)`` (the
dense MLP's down-projection input) and ``n_e = log ||h_e||`` for each expert ``e``, the target is ``n`` standardised
across the token's experts (mean 0, std 1). A ridge regression from the MLP's input ``x`` (with a bias) fits it in
closed form, and the router's effective logits are ``ACTIVATION_TEMPERATURE`` times the fit: at threshold 0.5
(logit 0) about half the experts run at the start, those with the largest activations the fit predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .experts import expert_energy
from .router import RoutedMLP, gated_activation

ACTIVATION_TEMPERATURE = 3.0  # effective logits = 3 x the standardised fit: scores away from 0.5 at the start
RIDGE = 1e-3  # relative to the mean eigenvalue of x'x: keeps the solve stable for a few thousand tokens


def each_mlp_input(model: nn.Module, modules: list[nn.Module], batches: Iterable[dict], visit: Callable) -> int:
    """Run ``batches`` through ``model`` (eval mode, no gradients, ``labels`` dropped) and call ``visit(i, rows)`` with
    the (tokens, hidden) input of ``modules[i]`` for each batch's real tokens (its ``attention_mask``, when present).

    The calibration forward of :func:`fit_routers` and of ``scripts/lte_expert_floor.py``. The model's training mode
    is restored. Returns the number of tokens seen."""
    mask: list[torch.Tensor | None] = [None]

    def hook_of(index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            if mask[0] is not None:
                rows = rows[mask[0].reshape(-1).bool()]
            visit(index, rows)

        return hook

    hooks = [module.register_forward_pre_hook(hook_of(i)) for i, module in enumerate(modules)]
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                tokens += int(mask[0].sum()) if mask[0] is not None else int(batch["input_ids"].numel())
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return tokens


def fit_routers(blocks: list[RoutedMLP], model: nn.Module, batches: Iterable[dict]) -> int:
    """Fit every block's router to its MLP's per-token expert activations on ``batches`` (dicts the model takes,
    with ``attention_mask`` marking the tokens to use when present), with every expert on while measuring.

    The caller runs this with every score over the threshold (``router_init: open`` values, stage hard), so that
    the forward is the dense model's. Returns the number of tokens fitted on.
    """
    grams: list[torch.Tensor | None] = [None] * len(blocks)
    cross: list[torch.Tensor | None] = [None] * len(blocks)

    def accumulate(index: int, rows: torch.Tensor) -> None:
        block = blocks[index]
        h = gated_activation(block.block, block.shape, rows)
        energy = expert_energy(h, block.expert_of, block.router.weight.shape[0])
        target = energy.clamp_min(1e-12).log() / 2
        target = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True).clamp_min(1e-6)
        features = torch.cat([rows.double(), torch.ones(rows.shape[0], 1, dtype=torch.double, device=rows.device)], 1)
        gram, xy = features.T @ features, features.T @ target.double()
        grams[index] = gram if grams[index] is None else grams[index] + gram
        cross[index] = xy if cross[index] is None else cross[index] + xy

    tokens = each_mlp_input(model, [block.block for block in blocks], batches, accumulate)
    with torch.no_grad():
        for block, gram, xy in zip(blocks, grams, cross):
            if gram is None:
                continue
            ridge = RIDGE * torch.diagonal(gram).mean()
            solution = torch.linalg.solve(
                gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), xy
            )  # (h + 1, E)
            effective = ACTIVATION_TEMPERATURE * solution.T
            router = block.router
            router.weight.copy_((effective[:, :-1] / router.lr_scale).to(router.weight.dtype))
            router.bias.copy_((effective[:, -1] / router.lr_scale).to(router.bias.dtype))
    return tokens
