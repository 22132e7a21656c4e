"""The per-MLP router and the routed forward of a gated MLP, found through the registry's `BlockShape`.

A gated MLP computes ``down(act(gate(x)) * up(x))`` (Llama-style: ``gate_proj``/``up_proj``; fused: Phi-3's and
GLM's ``gate_up_proj`` split in two halves). Its router scores each expert per token, ``G(x) = sigmoid(x W_g + b)``
(one row of ``W_g`` per expert; the paper has no bias, ``b`` here starts at 0 unless ``router_init: open``). The routed forward multiplies each neuron's activation
``h_j = act(gate_j) * up_j`` by a per-token weight before ``down``:

* ``soft`` (stage 1): the score of the neuron's expert, so the output is the score-weighted sum of the experts'
  outputs, and the router gets the task loss's gradient; with ``soft_forward: straight_through`` the forward uses
  the hard selection (1 over the threshold, else 0) while the gradient flows as if the weight were the score;
* ``hard`` (stage 2, inference): 1 when its expert's score exceeds the threshold, else 0 (the router runs without
  gradient). With every expert over the threshold this is the dense MLP exactly.

The projections are called as modules, so PEFT LoRA wrappers and biases behave as without LTE. Every neuron is
computed and masked: this is the exact reference. In stage hard, in eval mode with autograd off, on the CPU, the
fast path of :mod:`.inference` computes only the selected experts instead (and falls back to this reference when
every expert is selected, or when a projection is not a plain ``nn.Linear``).

The router is a submodule of the MLP (``lte_router``), so it moves with the model (``.to``, device placement),
is found by ``model.parameters()`` (the Trainer's optimizer, gradient clipping and DDP see it without extra
wiring), and is gathered with its MLP under FSDP or ZeRO-3; a state-dict hook leaves it out of
``model.state_dict()``, so ``save_pretrained`` writes a plain model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..patch.registry import BlockShape
from .inference import ExpertLayout, plain_projections

ROUTER_ATTR = "lte_router"
OPEN_LOGIT = 3.0  # router_init "open": every score sigmoid(3) = 0.95 at the start


def is_gated(shape: BlockShape) -> bool:
    """Whether ``shape`` is a gated MLP (a gate and an up projection, or one fused gate_up), which LTE routes."""
    if shape.kind != "mlp" or shape.activation is None:
        return False
    if shape.fused:
        return [s.name for s in shape.fused] == ["gate", "up"]
    return len(shape.inputs) == 2


def base_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a projection, or of the base layer of a PEFT LoRA wrapper."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.weight


def mlp_width(block: nn.Module, shape: BlockShape) -> int:
    """The number of neurons of a gated MLP (rows of its gate projection; half the fused gate_up's)."""
    rows = base_weight(getattr(block, shape.inputs[0])).shape[0]
    return rows // 2 if shape.fused else rows


def neuron_features(block: nn.Module, shape: BlockShape) -> torch.Tensor:
    """(n, 2 * hidden): each neuron's gate row and up row side by side (what the experts are grouped by)."""
    if shape.fused:
        gate, up = base_weight(getattr(block, shape.inputs[0])).chunk(2, dim=0)
    else:
        gate, up = (base_weight(getattr(block, a)) for a in shape.inputs)
    return torch.cat([gate, up], dim=1).detach()


def gated_activation(block: nn.Module, shape: BlockShape, x: torch.Tensor) -> torch.Tensor:
    """``act(gate(x)) * up(x)``: the (..., n) input of ``down``."""
    if shape.fused:
        gate, up = getattr(block, shape.inputs[0])(x).chunk(2, dim=-1)
    else:
        gate, up = getattr(block, shape.inputs[0])(x), getattr(block, shape.inputs[1])(x)
    return getattr(block, shape.activation)(gate) * up


class Router(nn.Module):
    """``G(x) = sigmoid(lr_scale * (x W_g + b))``: one score in (0, 1) per expert per token, in float32.

    ``lr_scale`` is a fixed multiplier, not a parameter: the stored ``weight`` and ``bias`` are the effective ones
    divided by it. Under Adam-type optimizers (a step's size is set by the learning rate, not the gradient's scale)
    the effective router then moves ``lr_scale`` times faster than the model's weights, without a parameter group of
    its own, so the Trainer's optimizer, schedule, checkpoints, DeepSpeed and FSDP need nothing extra. At the
    fine-tuning learning rates of a pretrained model a router moves too little otherwise to learn anything in a run.
    """

    def __init__(
        self,
        hidden: int,
        experts: int,
        lr_scale: float = 1.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.lr_scale = lr_scale
        self.weight = nn.Parameter(torch.zeros(experts, hidden, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(experts, device=device, dtype=dtype))

    def reset(self, init: str, generator: torch.Generator) -> None:
        """Effective values: ``normal``: weight std 1/sqrt(hidden), drawn on the CPU from ``generator`` (the same on
        every device), bias 0; ``zeros``: every score 0.5; ``open``: weight 0, bias ``OPEN_LOGIT`` (every score
        sigmoid(3) = 0.95: every expert on, the soft stage starts as the dense model up to a 5% scale)."""
        with torch.no_grad():
            self.bias.zero_()
            if init == "normal":
                std = 1.0 / math.sqrt(self.weight.shape[1])
                self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std / self.lr_scale)
            else:
                self.weight.zero_()
            if init in ("open", "activations"):  # activations: open until fitted (sat_trainer.lte.fit)
                self.bias.fill_(OPEN_LOGIT / self.lr_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((F.linear(x, self.weight, self.bias) * self.lr_scale).float())


class RoutedMLP:
    """One routed MLP: its block, shape, router, expert of each neuron, and the bound forward.

    ``context`` is read at every forward: ``stage`` ("soft" or "hard"), ``threshold``, ``soft_forward``,
    ``router_grad_to_model`` (whether the router's input passes gradient to the layers below, in stage soft), and
    ``record(index, scores)`` which receives this MLP's scores (for the losses and the logged active fraction).
    """

    def __init__(self, index: int, name: str, shape: BlockShape, block: nn.Module, router: Router, expert_of: torch.Tensor):
        self.index, self.name, self.shape, self.block = index, name, shape, block
        self.router = router
        self.expert_of = expert_of.to(router.weight.device)
        self.context = None
        self.layout: ExpertLayout | None = None  # the fast path's buffers, while it is in use
        self._hooks: list = []

    @property
    def width(self) -> int:
        return self.expert_of.numel()

    def patch(self, context) -> None:
        """Bind the routed forward onto the block instance and register the router as its submodule."""
        self.context = context
        setattr(self.block, ROUTER_ATTR, self.router)
        self._hooks = [
            self.router.register_state_dict_post_hook(_drop_own_keys),
            self.router.register_load_state_dict_post_hook(_forgive_missing_router_keys),
        ]
        routed = self

        def forward(block_self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return routed.forward(x)

        self.block.forward = forward.__get__(self.block)

    def unpatch(self) -> None:
        """Put back the class's forward and drop the router submodule and its hooks."""
        self.block.__dict__.pop("forward", None)
        if getattr(self.block, ROUTER_ATTR, None) is self.router:
            delattr(self.block, ROUTER_ATTR)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.layout = None

    def fast_layout(self) -> ExpertLayout | None:
        """The expert-contiguous buffers of the fast path (built, or rebuilt when a source weight or the expert
        order changed), or None where the fast path does not apply: a projection that is not a plain
        ``nn.Linear``, or weights off the CPU (see :mod:`.inference` for the GPU plan)."""
        if self.layout is not None and self.layout.is_current(self.block, self.shape, self.expert_of):
            return self.layout
        projections = plain_projections(self.block, self.shape)
        if projections is None or projections[0].weight.device.type != "cpu":
            self.layout = None
            return None
        if self.expert_of.device != projections[0].weight.device:  # the model moved since apply_lte
            self.expert_of = self.expert_of.to(projections[0].weight.device)
        if self.layout is None or self.layout.key != ExpertLayout.source_key(projections, self.expert_of):
            self.layout = None  # free the stale copy before building the new one
            self.layout = ExpertLayout(
                self.block, self.shape, projections, self.expert_of, self.width // self.router.weight.shape[0]
            )
        return self.layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.context.stage == "soft":
            self.layout = None
            scores = self.router(x if self.context.router_grad_to_model else x.detach())
            self.context.record(self.index, scores)
            if self.context.soft_forward == "straight_through":  # the hard selection's value, the score's gradient
                hard = (scores > self.context.threshold).to(scores.dtype)
                return self._masked(x, hard + scores - scores.detach())
            return self._masked(x, scores)
        with torch.no_grad():
            scores = self.router(x)
        self.context.record(self.index, scores)
        selected = scores > self.context.threshold
        if self.block.training:
            self.layout = None  # fine-tuning changes the weights: the buffers are rebuilt at the next eval
        elif not torch.is_grad_enabled():
            layout = self.fast_layout()
            out = None if layout is None else layout.forward(x, selected)
            if out is not None:
                return out
        return self._masked(x, selected)

    def _masked(self, x: torch.Tensor, per_expert: torch.Tensor) -> torch.Tensor:
        """The reference: every neuron computed, its activation times its expert's score (soft) or selection (hard)."""
        h = gated_activation(self.block, self.shape, x)
        if self.expert_of.device != h.device:  # the model moved since apply_lte
            self.expert_of = self.expert_of.to(h.device)
        weights = per_expert.index_select(-1, self.expert_of).to(h.dtype)
        return getattr(self.block, self.shape.output)(h * weights)


def _drop_own_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of a router: its entries leave the model's state dict (the saved model stays plain)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _forgive_missing_router_keys(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook: a plain checkpoint has no router entries, which is not a missing key (strict loads pass)."""
    own = f".{ROUTER_ATTR}."
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if own not in f".{k}"]
