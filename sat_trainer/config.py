"""`SATConfig`: every SAT setting in one validated dataclass, loadable from YAML.

Each field describes itself in its ``metadata`` (PEFT/TRL style): ``help`` (what it does, what is
allowed, when to change it), ``group`` (one of `GROUPS`) and, where its annotation alone does not
say what is allowed, a ``range`` (a `Range`) or an ``allowed`` text with a ``check``. The type and
range checks are derived from the annotations (``Literal`` types for the enums) and that metadata
(:class:`~sat_trainer.settings.Settings`, shared with ``LTEConfig``),
and docs/configuration.md is generated from the same place (``scripts/config_reference.py``), so
the error messages, the reference and the code cannot drift apart. Validation happens in
``__post_init__``: a bad value fails when the config is built, before any model is touched, with
one message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from . import settings
from .errors import SATConfigError
from .settings import LAYER_INDICES, FieldDoc, Settings, layer_indices
from .value_range import ints, numbers

Metric = Literal["uniform", "magnitude", "wanda", "maxip", "activation"]
Selection = Literal["topk", "sampling"]
Schedule = Literal["ladder", "constant", "linear", "cosine", "est"]
Target = Literal["mlp", "attention", "layers"]
DrawEvery = Literal["step", "micro_batch"]
OmittedUpdate = Literal["optimizer", "freeze", "momentum"]
AttentionUnit = Literal["kv_group", "query_head"]
OmitIn = Literal["forward_backward", "backward", "weight_gradient"]
Compensation = Literal["none", "mean"]
SparseTokens = Literal["all", "context"]
LayerRates = Literal["uniform", "auto"]
RateBudget = Literal["flops", "loss"]
ActivationScores = Literal["auto", "training_forward", "subsample"]
Rescale = Literal["none", "inverse_keep"]

METRICS = get_args(Metric)
SELECTIONS = get_args(Selection)
TARGETS = get_args(Target)
# schedule est: the axes a stage keeps a fraction of, and the target each axis thins
EST_AXES = {"layers": "layers", "heads": "attention", "channels": "mlp"}

OMITTED = "What is omitted"
OMITTED_UNITS = "What omitted units do"
SCORING = "Scoring and selection"
SCHEDULE = "Schedule"
LAYER_RATES = "Per-layer rates"
SFT_SPLIT = "SFT token split"

# Each group's heading in docs/configuration.md and what its settings have in common.
GROUPS = {
    OMITTED: "Which units of which blocks a step leaves out, how many, and in which pass. A unit is an MLP channel (a row "
    "of gate/up and a column of down) or an attention unit (`attention_unit`). At the same rate, `omit_in: backward` "
    "saves about 2/3 and `weight_gradient` about 1/3 of what `forward_backward` saves (a step's matmul FLOPs are about "
    "a third forward, a third input gradients and a third weight gradients).",
    OMITTED_UNITS: "What happens to the units a step leaves out: their output in the forward and their update in the "
    "optimizer step. `freeze` and `momentum` restore or rewrite parameters around the optimizer step, so they cannot "
    "run under DeepSpeed, whose engine steps the optimizer itself; `momentum` under fp16 needs `max_grad_norm` > 0.",
    SCORING: "How units are scored and which of them a draw keeps. A draw picks the kept units of every block; "
    "draws depend only on (`seed`, draw number, layer), so every rank of a distributed run keeps the same units.",
    SCHEDULE: "How the omission rate runs over training: dense for the first `dense_warmup_fraction` of the steps, "
    "then the schedule, which peaks at `omission_rate`; or, with `schedule: est`, in stages that each keep their own "
    "fraction of the layers, heads and channels (`est_stages`).",
    LAYER_RATES: "Per-block peak rates measured at train start instead of one `omission_rate` for every block. The "
    "calibration table is logged and saved in `report.json` (`sat_calibration`) and in checkpoints, so a resumed run "
    "keeps its rates; each block's rate then follows the schedule, scaled by rate(t) / `omission_rate`, so `auto` "
    "needs `omission_rate` > 0.",
    SFT_SPLIT: "In supervised fine-tuning most tokens are context (prompt, template, padding) and only the response "
    "carries the loss: the loss tokens can run dense while the context runs sparse, in one step. With "
    "`sparse_tokens: context`, `targets` must be `[mlp]` (attention mixes tokens), `compensation` `none` and "
    "`omitted_update` `optimizer` (the omitted channels' gradients are real: the loss tokens' share).",
}


def _ascending_rates(value: Any) -> list[float]:
    inside = numbers(0, 1, low_open=True, high_open=True)
    if not isinstance(value, (list, tuple)) or not value or not all(inside.allows(r) for r in value):
        raise ValueError
    if any(a >= b for a, b in itertools.pairwise(value)):
        raise ValueError
    return [float(r) for r in value]


def _ladder_rungs(value: Any) -> list[list[float]]:
    below_one = numbers(0, 1, high_open=True)
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError
    if not all(isinstance(r, (list, tuple)) and len(r) == 2 and all(below_one.allows(v) for v in r) for r in value):
        raise ValueError
    starts, rates = [float(r[0]) for r in value], [float(r[1]) for r in value]
    if starts[0] != 0.0 or any(a >= b for a, b in itertools.pairwise(starts)) or rates[-1] != 0.0:
        raise ValueError
    return value


EST_STAGE = "a mapping with a fraction and any of " + ", ".join(EST_AXES)


def _est_stages(value: Any) -> list[dict[str, float]]:
    """The stages' shape: a non-empty list of mappings, each with a ``fraction`` and any of the axes' keep
    fractions (numbers; an axis left out keeps everything, 1.0). Their ranges and sum are checked in
    `_check_est` (one message each)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError
    stages = []
    for stage in value:
        if not isinstance(stage, Mapping) or "fraction" not in stage or set(stage) - {"fraction", *EST_AXES}:
            raise ValueError
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in stage.values()):
            raise ValueError
        stages.append({"fraction": float(stage["fraction"]), **{a: float(stage.get(a, 1.0)) for a in EST_AXES}})
    return stages


@dataclass
class SATConfig(Settings):
    """Settings of Sparsity-Accelerated Training; every field is optional and validated when the config is built.

    Args:
        **settings: any field by name, e.g. ``SATConfig(omission_rate=0.5, metric="activation")``; the YAML keys
            (``sat:`` block of a ``sat-train`` scenario, or the top level of a file for `from_yaml`) are the same
            names. What each field does, what it allows and its default: docs/configuration.md, generated from
            this class (``python scripts/config_reference.py --write``).

    Raises:
        SATConfigError: a value of the wrong type, out of its range, or a combination that is refused; the
            message names the key, the value and what is allowed.
    """

    omission_rate: float = field(
        default=0.5,
        metadata={
            "group": OMITTED,
            "range": numbers(0, 1, high_open=True),
            "help": "Peak fraction of each block's units omitted per step; the schedule scales it over training. "
            "Lower it with omit_in forward_backward, where the loss itself is the sparse network's.",
        },
    )
    targets: list[Target] = field(
        default_factory=lambda: ["mlp"],
        metadata={
            "group": OMITTED,
            "help": "Which units a step omits: a non-empty subset of mlp (channels), attention (heads) and layers "
            "(whole decoder layers, skipped as identities: omit_in forward_backward; dense_layers are never skipped); "
            "a single name is a list of one. Adding attention saves more time per step but costs more quality than "
            "MLP channels alone.",
        },
    )
    attention_unit: AttentionUnit = field(
        default="kv_group",
        metadata={
            "group": OMITTED,
            "help": "What an attention block omits: kv_group (a KV head with all its query heads: q, k, v rows and o "
            "columns) or query_head (the same number of query heads in every KV group; k and v stay dense).",
        },
    )
    omit_in: OmitIn = field(
        default="backward",
        metadata={
            "group": OMITTED,
            "help": "Where omitted units are skipped: forward_backward (the paper's SAT: the sparse network is "
            "trained), backward (the forward runs dense, so the loss is the real model's; only kept units "
            "get and pass on gradients) or weight_gradient (only the omitted units' weight gradients are "
            "skipped). Each saves less per step than the one before and changes training less.",
        },
    )
    compensation: Compensation = field(
        default="none",
        metadata={
            "group": OMITTED_UNITS,
            "help": "none, or mean (omit_in forward_backward, metric activation, MLP blocks): each omitted channel's "
            "output is replaced by its mean over the scoring subsample, a constant added to the down "
            "projection's output (FLAP-style).",
        },
    )
    rescale: Rescale = field(
        default="none",
        metadata={
            "group": OMITTED_UNITS,
            "help": "none, or inverse_keep (omit_in forward_backward; EST's dropout-style scaling): while a block runs "
            "sparse, its kept units' outputs are multiplied by units / kept units (the output projection's input, so "
            "its bias is not scaled) and the block's output stays unbiased over random draws. Skipped layers are "
            "not rescaled.",
        },
    )
    sparse_tokens: SparseTokens = field(
        default="all",
        metadata={
            "group": SFT_SPLIT,
            "help": "Which tokens omit units: all, or context (SparseLoRA's split; targets mlp only): tokens that "
            "carry the loss run every channel, the context tokens only the kept ones. Needs labels in the "
            "model's forward (one host sync per forward finds the split); a forward without labels runs all "
            "tokens sparse.",
        },
    )
    metric: Metric = field(
        default="activation",
        metadata={
            "group": SCORING,
            "help": "How units are scored: uniform (random), magnitude, wanda, maxip or activation (what each unit "
            "outputs on a token subsample, times its output weights' norm). Keep activation on a pretrained "
            "model; the others are baselines.",
        },
    )
    selection: Selection = field(
        default="topk",
        metadata={
            "group": SCORING,
            "help": "Which units a draw keeps: topk, the highest-scoring; or sampling, drawn with probability ~ "
            "score^(1/temperature), so every unit trains sometimes.",
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "group": SCORING,
            "range": numbers(0, low_open=True),
            "help": "selection sampling: the temperature; higher is closer to uniform, lower closer to topk.",
        },
    )
    schedule: Schedule = field(
        default="constant",
        metadata={
            "group": SCHEDULE,
            "help": "The omission rate over the steps after the dense start: ladder (LORS, the paper's: steps down "
            "to dense at the end), constant, linear, cosine, or est (EST's stages: est_stages gives each stage's "
            "keep fraction per axis; omission_rate is then unused). Use ladder or est with omit_in forward_backward, "
            "so the trained network ends dense; with a dense forward, ending dense buys little.",
        },
    )
    ladder_sparse_fraction: float = field(
        default=0.75,
        metadata={
            "group": SCHEDULE,
            "range": numbers(0, 1, low_open=True, high_open=True),
            "help": "schedule ladder: fraction of the scheduled steps spent at the peak omission_rate; the rest "
            "steps down to dense.",
        },
    )
    ladder_num_rungs: int = field(
        default=2,
        metadata={
            "group": SCHEDULE,
            "range": ints(1),
            "help": "schedule ladder: number of equally long rungs after the sparse phase, stepping the rate down "
            "evenly; the last rung is 0 (dense).",
        },
    )
    ladder_rungs: list[list[float]] | None = field(
        default=None,
        metadata={
            "group": SCHEDULE,
            "check": _ladder_rungs,
            "allowed": "a list of [start_fraction, rate] pairs, first start 0, starts increasing in [0, 1), rates in "
            "[0, 1), last rate 0",
            "help": "schedule ladder: explicit [[start_fraction, rate], ...] rungs that override "
            "ladder_sparse_fraction and ladder_num_rungs.",
        },
    )
    est_stages: list[dict[str, float]] | None = field(
        default=None,
        metadata={
            "group": SCHEDULE,
            "check": _est_stages,
            "allowed": f"a non-empty list of stages, each {EST_STAGE} (keep fractions in (0, 1]; left out: 1); "
            "stage fractions in (0, 1] adding up to 1",
            "help": "schedule est: the stages in order, e.g. [{fraction: 0.6, layers: 0.5, heads: 0.5, channels: 0.5}, "
            "{fraction: 0.4}]. fraction: the stage's share of the scheduled steps; layers, heads, channels: the fraction "
            "of decoder layers, attention heads and MLP channels a step keeps. An axis below 1 needs its target "
            "(layers, attention, mlp) in targets.",
        },
    )
    layer_rates: LayerRates = field(
        default="uniform",
        metadata={
            "group": LAYER_RATES,
            "help": "uniform: every block's peak rate is omission_rate; auto: a calibration at train start measures "
            "each block's cost at each of calibration_rates and gives each block its own peak rate, meeting "
            "rate_budget at the least summed cost. dense_layers is the manual form.",
        },
    )
    rate_budget: RateBudget = field(
        default="flops",
        metadata={
            "group": LAYER_RATES,
            "help": "layer_rates auto: flops saves as many FLOPs as the uniform omission_rate over the same blocks; "
            "loss saves the most FLOPs whose summed calibrated cost stays within loss_budget.",
        },
    )
    loss_budget: float = field(
        default=0.01,
        metadata={
            "group": LAYER_RATES,
            "range": numbers(0, low_open=True),
            "help": "rate_budget loss: the largest summed cost, a fraction: of the loss (omit_in forward_backward, "
            "where a block's cost is the relative loss increase) or of the squared gradient norm (backward, "
            "weight_gradient).",
        },
    )
    calibration_rates: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        metadata={
            "group": LAYER_RATES,
            "check": _ascending_rates,
            "allowed": "a non-empty ascending list of rates in (0, 1)",
            "help": "layer_rates auto: the rates each block is measured at and may be given.",
        },
    )
    calibration_batches: int = field(
        default=2,
        metadata={
            "group": LAYER_RATES,
            "range": ints(1),
            "help": "layer_rates auto: how many training batches (the first ones) the calibration measures on; more "
            "is steadier and slower to start.",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "group": SCORING,
            "help": "Seed of the selection's random draws, which depend only on (seed, draw number, layer).",
        },
    )
    draw_every: DrawEvery = field(
        default="step",
        metadata={
            "group": SCORING,
            "help": "step: one kept set per optimizer step, shared by its micro-batches; micro_batch: a new one per micro-batch.",
        },
    )
    omitted_update: OmittedUpdate = field(
        default="optimizer",
        metadata={
            "group": OMITTED_UNITS,
            "help": "What the optimizer does with omitted rows: optimizer (zero gradient; the optimizer still moves "
            "them by momentum and weight decay), freeze (their weights are restored after the step) or "
            "momentum (Adam-family optimizers: their gradient is replaced by their own first moment, so they "
            "continue their recent direction).",
        },
    )
    momentum_decay: float = field(
        default=1.0,
        metadata={
            "group": OMITTED_UNITS,
            "range": numbers(0, 1),
            "help": "omitted_update momentum: each step a slice stays omitted, its first moment is multiplied by "
            "this. 1 carries it unchanged, the optimizer's beta1 does what omitted_update optimizer does, "
            "and values between fade the continued update out over about 1 / (1 - momentum_decay) steps.",
        },
    )
    maxip_tokens: int = field(
        default=64,
        metadata={
            "group": SCORING,
            "range": ints(1),
            "help": "metric maxip: how many tokens are subsampled per draw to score units.",
        },
    )
    activation_tokens: int = field(
        default=256,
        metadata={
            "group": SCORING,
            "range": ints(1),
            "help": "metric activation: the fewest tokens of the micro-batch subsampled to measure units' outputs "
            "(all tokens if it has fewer); see activation_token_fraction.",
        },
    )
    activation_token_fraction: float = field(
        default=0.125,
        metadata={
            "group": SCORING,
            "range": numbers(0, 1, low_open=True),
            "help": "metric activation: the subsample is this fraction of the micro-batch's tokens when that is more "
            "than activation_tokens, so scoring's share of the step stays the same at every batch size.",
        },
    )
    activation_scores: ActivationScores = field(
        default="auto",
        metadata={
            "group": SCORING,
            "help": "metric activation: subsample measures every unit on a token subsample of the micro-batch about "
            "to run; training_forward reads the training forward's own outputs (this step's when the forward is "
            "dense, else the previous one's, re-measuring 1/remeasure_every of the channels per draw). auto: "
            "training_forward when omit_in keeps the forward dense, else subsample.",
        },
    )
    remeasure_every: int = field(
        default=8,
        metadata={
            "group": SCORING,
            "range": ints(1),
            "help": "activation_scores training_forward with a sparse forward: every channel is re-measured on the subsample "
            "at least every this many draws (1: all of them each draw, as subsample does).",
        },
    )
    score_every: int = field(
        default=1,
        metadata={
            "group": SCORING,
            "range": ints(1),
            "help": "Re-score the units every this many draws; draws in between reuse the last scores, so topk keeps "
            "the same set. Raise it to cut scoring's share of the step.",
        },
    )
    dense_layers: list[int] = field(
        default_factory=list,
        metadata={
            "group": OMITTED,
            "check": layer_indices,
            "allowed": LAYER_INDICES,
            "help": "Decoder layers whose blocks never omit units, e.g. [0, 1, 2, -1] (SparseLoRA keeps the first "
            "three and the last layer dense).",
        },
    )
    dense_warmup_fraction: float = field(
        default=0.375,
        metadata={
            "group": SCHEDULE,
            "range": numbers(0, 1, high_open=True),
            "help": "Fraction of the steps trained dense before the schedule starts; an omitted update costs most in "
            "the first steps, where the loss falls fastest. 0 starts sparse, as the paper's SAT does.",
        },
    )

    KIND = "SAT"
    SECTION = "sat"
    ERROR = SATConfigError
    EXAMPLE = "{'omission_rate': 0.5}"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_combinations(self)

    def scores_from_forward(self) -> bool:
        """Whether activation MLP scores come from the training forward (activation_scores, auto resolved)."""
        if self.activation_scores == "auto":
            return self.omit_in != "forward_backward"
        return self.activation_scores == "training_forward"


def to_config(config: Any) -> SATConfig:
    """What ``SATCallback`` and ``apply_sat`` accept: a SATConfig, a mapping of its keys, a YAML
    path, or None (defaults); anything else raises one line saying so."""
    return SATConfig.coerce(config)


def field_help() -> dict[str, str]:
    """Help text per key, for docs and CLI listings."""
    return settings.field_help(SATConfig)


def field_docs() -> list[FieldDoc]:
    """Every field of `SATConfig` in declaration order, as docs/configuration.md lists it."""
    return settings.field_docs(SATConfig)


def _check_combinations(cfg: SATConfig) -> None:
    """The combinations of individually valid values that are refused, each with the reason."""
    if cfg.compensation == "mean" and (cfg.omit_in != "forward_backward" or cfg.metric != "activation"):
        SATConfig.fail(
            "compensation",
            cfg.compensation,
            "none, or mean with omit_in forward_backward (a dense forward has nothing to "
            "compensate) and metric activation (the mean is taken over the channel outputs that metric computes)",
        )
    if cfg.sparse_tokens == "context" and (cfg.targets != ["mlp"] or cfg.compensation != "none"):
        SATConfig.fail(
            "sparse_tokens",
            cfg.sparse_tokens,
            "all, or context with targets [mlp] (attention mixes tokens: a head "
            "cannot be omitted for some tokens only) and compensation none",
        )
    if cfg.sparse_tokens == "context" and cfg.omitted_update != "optimizer":
        SATConfig.fail(
            "omitted_update",
            cfg.omitted_update,
            "optimizer with sparse_tokens context: the loss tokens run every channel, so "
            "the omitted channels' gradients are real (those tokens' share), and freeze or momentum would discard them",
        )
    if cfg.layer_rates == "auto" and cfg.omission_rate == 0:
        SATConfig.fail(
            "layer_rates",
            cfg.layer_rates,
            "uniform, or auto with omission_rate > 0 (the schedule scales each block's peak rate by rate(t) / omission_rate)",
        )
    if cfg.momentum_decay != 1.0 and cfg.omitted_update != "momentum":
        SATConfig.fail(
            "momentum_decay",
            cfg.momentum_decay,
            "1 unless omitted_update is momentum (it scales that mode's continued first moment)",
        )
    _check_rescale_and_layers(cfg)
    _check_est(cfg)


def _check_rescale_and_layers(cfg: SATConfig) -> None:
    """rescale and the layers target need a sparse forward, and do not mix with what measures or splits it."""
    if cfg.rescale == "inverse_keep" and (
        cfg.omit_in != "forward_backward" or cfg.sparse_tokens != "all" or cfg.compensation != "none"
    ):
        SATConfig.fail(
            "rescale",
            cfg.rescale,
            "none, or inverse_keep with omit_in forward_backward (a dense forward has nothing to rescale), "
            "sparse_tokens all and compensation none",
        )
    if "layers" in cfg.targets and cfg.omit_in != "forward_backward":
        SATConfig.fail(
            "targets",
            cfg.targets,
            "layers only with omit_in forward_backward: a skipped layer runs nothing, forward or backward",
        )
    if "layers" in cfg.targets and cfg.layer_rates == "auto":
        SATConfig.fail(
            "layer_rates",
            cfg.layer_rates,
            "uniform with targets layers (the calibration measures blocks, not whole layers)",
        )


def _check_est(cfg: SATConfig) -> None:
    """schedule est and est_stages come together; each stage's fraction and keeps in (0, 1], fractions adding to 1,
    and an axis thinned only where its target is in targets."""
    if cfg.est_stages is not None and cfg.schedule != "est":
        SATConfig.fail("est_stages", cfg.est_stages, "null unless schedule is est (they are that schedule's stages)")
    if cfg.schedule != "est":
        return
    if cfg.est_stages is None:
        SATConfig.fail("schedule", cfg.schedule, "ladder, constant, linear or cosine; est only with est_stages set")
    if cfg.layer_rates == "auto":
        SATConfig.fail("layer_rates", cfg.layer_rates, "uniform with schedule est (its stages give each axis its rate)")
    for i, stage in enumerate(cfg.est_stages):
        for key, value in stage.items():
            if not 0.0 < value <= 1.0:
                what = "a stage's share of the scheduled steps" if key == "fraction" else "a keep fraction"
                SATConfig.fail(f"est_stages[{i}].{key}", value, f"{what} in (0, 1]")
        for axis, target in EST_AXES.items():
            if stage[axis] < 1.0 and target not in cfg.targets:
                SATConfig.fail(f"est_stages[{i}].{axis}", stage[axis], f"1 unless targets include {target}")
    fractions = [stage["fraction"] for stage in cfg.est_stages]
    if abs(math.fsum(fractions) - 1.0) > 1e-6:
        SATConfig.fail(
            "est_stages",
            cfg.est_stages,
            f"stage fractions adding up to 1 (these fractions {fractions} add up to {math.fsum(fractions):g})",
        )
