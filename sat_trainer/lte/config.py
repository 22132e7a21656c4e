"""`LTEConfig`: every LTE setting in one validated dataclass, in :class:`~sat_trainer.config.SATConfig`'s style.

Each field describes itself in its ``metadata``: ``help``, ``group`` (one of `GROUPS`) and, where the annotation
alone does not say what is allowed, a ``range`` (a :class:`~sat_trainer.value_range.Range`) or an ``allowed`` text
with a ``check``. The checks are derived from the annotations (``Literal`` for the choices) and that metadata
(:class:`~sat_trainer.settings.Settings`, shared with ``SATConfig``), so
a bad value fails when the config is built, before any model is touched, with one message naming the key, the
value and what is allowed. Settings that depend on the model (an ``expert_size`` that must divide the MLP width,
``dense_layers`` inside the model) are checked by :func:`~sat_trainer.lte.model.apply_lte` before it changes anything.

Where the paper leaves a value open (the loss weights, the stage split, the router's initialisation), the default
is a reasonable starting point that no measurement has tuned yet, and its help says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..settings import LAYER_INDICES, Settings, layer_indices
from ..value_range import ints, numbers
from .errors import LTEConfigError

RouterInit = Literal["normal", "zeros", "open", "activations"]
Stage = Literal["soft", "hard"]
SoftForward = Literal["weighted", "straight_through"]

EXPERTS = "Experts"
ROUTER = "Router"
LOSSES = "Losses"
STAGES = "Stages"

GROUPS = {
    EXPERTS: "How each gated MLP's neurons (a row of gate and up, a column of down) are grouped into equal-size experts.",
    ROUTER: "The per-MLP router: one sigmoid score per expert per token, from the MLP's input.",
    LOSSES: "The terms stage 1 adds to the training loss (the model's own loss is left as it is).",
    STAGES: "Stage 1 (soft) trains model and routers with each expert's output weighted by its score; stage 2 (hard) "
    "freezes the routers and runs only the experts whose score exceeds the threshold.",
}


@dataclass
class LTEConfig(Settings):
    """Settings of LTE training and sparse inference; every field is optional and validated when the config is built.

    Args:
        **settings: any field by name, e.g. ``LTEConfig(expert_size=32, threshold=0.5)``; a YAML file's ``lte:``
            block (or its top level) uses the same names.

    Raises:
        LTEConfigError: an unknown key, a value of the wrong type or out of its range; the message names the key,
            the value and what is allowed.
    """

    expert_size: int = field(
        default=32,
        metadata={
            "group": EXPERTS,
            "range": ints(1),
            "help": "Neurons per expert (the paper's: 32). Must divide every routed MLP's width. Smaller experts "
            "select more finely and cost a larger router.",
        },
    )
    kmeans_iterations: int = field(
        default=20,
        metadata={
            "group": EXPERTS,
            "range": ints(1),
            "help": "Rounds of balanced k-means grouping the neurons by their gate and up weight rows (not tuned yet).",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "group": EXPERTS,
            "help": "Seed of the k-means start and the router initialisation (the same seed gives the same experts).",
        },
    )
    dense_layers: list[int] = field(
        default_factory=list,
        metadata={
            "group": EXPERTS,
            "check": layer_indices,
            "allowed": LAYER_INDICES,
            "help": "Decoder layers whose MLP gets no router and always runs every neuron, e.g. [0, -1].",
        },
    )
    router_init: RouterInit = field(
        default="normal",
        metadata={
            "group": ROUTER,
            "help": "The router's initial weights: normal (std 1/sqrt(hidden size), so scores start spread around "
            "0.5), zeros (every score starts at exactly 0.5) or open (weights 0, bias 3: every score starts at 0.95, "
            "every expert on, so stage 1 starts from the model as it was and only removes what the efficiency loss "
            "can afford) or activations (open until training starts, then each router is fitted to rank its experts "
            "as the dense model's own per-token activations do, on the first calibration_batches training batches: "
            "about half the experts run at threshold 0.5, those with the largest activations). The paper does not "
            "fix it.",
        },
    )
    calibration_batches: int = field(
        default=2,
        metadata={
            "group": ROUTER,
            "range": ints(1),
            "help": "router_init activations: how many training batches (the first ones) the routers are fitted on.",
        },
    )
    router_lr_scale: float = field(
        default=1.0,
        metadata={
            "group": ROUTER,
            "range": numbers(0, low_open=True),
            "help": "How many times faster than the model's weights the routers learn (under Adam-type optimizers; "
            "a fixed multiplier in the router's forward, so no parameter group is needed). A router trained at a "
            "pretrained model's fine-tuning rate barely moves in a short run.",
        },
    )
    router_grad_to_model: bool = field(
        default=False,
        metadata={
            "group": ROUTER,
            "help": "In stage 1, whether the router's input passes gradient to the layers below it. Off: the "
            "efficiency and separability losses train the routers only, and the model's weights learn from the task "
            "loss alone (through the score-weighted experts). On: those losses also reshape the hidden states the "
            "routers read, the paper's joint training read literally. Off by default by design (the routers' "
            "losses should not reshape the model); not yet measured against on.",
        },
    )
    threshold: float = field(
        default=0.5,
        metadata={
            "group": ROUTER,
            "range": numbers(0, 1, low_open=True, high_open=True),
            "help": "An expert runs for a token in stage 2 (and at inference) when its score exceeds this; the "
            "separability loss pushes scores away from it in stage 1.",
        },
    )
    efficiency_weight: float = field(
        default=0.1,
        metadata={
            "group": LOSSES,
            "range": numbers(0),
            "help": "Weight of the efficiency loss (the mean router score: lower scores, fewer experts). The paper "
            "varies it per task to trade quality for sparsity; this default is not tuned yet.",
        },
    )
    separability_weight: float = field(
        default=0.001,
        metadata={
            "group": LOSSES,
            "range": numbers(0),
            "help": "Weight of the separability loss (mean of 1 / (score - threshold)^2: scores away from the "
            "threshold, so stage 2's hard choice changes the network less). Not tuned yet.",
        },
    )
    soft_forward: SoftForward = field(
        default="weighted",
        metadata={
            "group": STAGES,
            "help": "Stage 1's forward: weighted (each expert's output times its score, the paper's) or "
            "straight_through (the hard selection of stage 2 in the forward, the score's gradient in the backward: "
            "the model trains on the network it will serve from the first step, and the efficiency loss cannot "
            "shrink every MLP's output by lowering all scores together).",
        },
    )
    soft_fraction: float = field(
        default=0.5,
        metadata={
            "group": STAGES,
            "range": numbers(0, 1),
            "help": "Fraction of the training steps in stage 1 (soft); the rest is stage 2 (hard). 1 never "
            "switches, 0 starts hard (routers as loaded or initialised). Not tuned yet.",
        },
    )

    KIND = "LTE"
    SECTION = "lte"
    ERROR = LTEConfigError
    EXAMPLE = "{'expert_size': 32}"


def to_lte_config(config: Any) -> LTEConfig:
    """What ``LTECallback`` and ``apply_lte`` accept: an LTEConfig, a mapping of its keys, a YAML path, or None (defaults)."""
    return LTEConfig.coerce(config)
