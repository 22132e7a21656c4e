"""`SATConfig`: every SAT setting in one validated dataclass, loadable from YAML.

Each field carries its help text in ``metadata["help"]`` (PEFT/TRL style) so the README table and
error messages come from one place. Validation happens in ``__post_init__``: a bad value fails
when the config is built, before any model is touched, with one message naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SATConfigError
from .yaml_io import load_yaml_file

METRICS = ("uniform", "magnitude", "wanda", "maxip", "activation")
SELECTIONS = ("topk", "sampling")
SCHEDULES = ("ladder", "constant", "linear", "cosine")
TARGETS = ("mlp", "attention")
DRAW_EVERY = ("step", "micro_batch")
OMITTED_UPDATES = ("optimizer", "freeze", "momentum")
ATTENTION_UNITS = ("kv_group", "query_head")
OMIT_IN = ("forward_backward", "backward", "weight_gradient")
COMPENSATIONS = ("none", "mean")
SPARSE_TOKENS = ("all", "context")
LAYER_RATES = ("uniform", "auto")
RATE_BUDGETS = ("flops", "loss")
ACTIVATION_SCORES = ("auto", "forward", "subsample")


@dataclass
class SATConfig:
    """Settings of Sparsity-Accelerated Training. All fields are optional; see each field's help."""

    omission_rate: float = field(
        default=0.5,
        metadata={"help": "Peak fraction of MLP channels / attention KV groups omitted per step, in [0, 1). Default "
                  "0.5, measured with the default omit_in backward (SmolLM2-135M CPT: +0.27% held-out loss with the "
                  "default dense start); with omit_in forward_backward 0.5 cost +3.5% and 0.25 +1.8% there "
                  "(docs/journal/benchmarks.md): lower it when you choose forward_backward."},
    )
    targets: list[str] = field(
        default_factory=lambda: ["mlp"],
        metadata={"help": "Which blocks omit neurons: any non-empty subset of ['mlp', 'attention']. "
                  "Default mlp: omitting attention groups as well cost +1.5% (CPT) and +33% (SFT) held-out "
                  "loss in docs/journal/benchmarks.md, MLP channels alone +0.1% and +1.9%."},
    )
    attention_unit: str = field(
        default="kv_group",
        metadata={"help": "What attention omits: kv_group (a KV head with all its query heads: q, k, v rows and o "
                  "columns) or query_head (query heads, the same number in every KV group; k and v stay dense)."},
    )
    omit_in: str = field(
        default="backward",
        metadata={"help": "Where omitted units are skipped: forward_backward (the sparse network is trained: "
                  "forward and backward on the kept units) or backward (the forward runs dense, so the loss is the "
                  "real model's; only the kept units get gradients and pass them on), or weight_gradient (forward and "
                  "input gradients dense: every layer gets its exact gradient; only the omitted units' weight "
                  "gradients are skipped, so they miss this step's update). At the same rate backward saves about "
                  "2/3 and weight_gradient 1/3 of what forward_backward saves. Default backward: every step trains the "
                  "real model, and on SmolLM2-135M CPT it lost about half of what forward_backward lost at the same "
                  "FLOPs saved (+2.26% against +4.75%, docs/journal/benchmarks.md); forward_backward is the paper's SAT."},
    )
    compensation: str = field(
        default="none",
        metadata={"help": "none, or mean (omit_in forward_backward, MLP blocks, metric activation): each omitted "
                  "channel's output is replaced by its mean over the scoring subsample, i.e. the constant bias "
                  "W_down[:, omitted] @ mean_h[omitted] (no gradient) is added to the down projection's output "
                  "(FLAP-style; on SmolLM2-135M it removed about a quarter of the sparse network's extra loss at rate 0.5)."},
    )
    sparse_tokens: str = field(
        default="all",
        metadata={"help": "Which tokens omit units: all, or context (SFT; SparseLoRA's split, MLP blocks): the tokens "
                  "that carry the loss (a label that is not -100, or the next token's) run dense, the context tokens "
                  "(prompt, template, padding) sparse, in one step. Needs labels in the model's forward; one host "
                  "sync per forward (not per block) finds the split. Forward without labels: all tokens sparse."},
    )
    metric: str = field(
        default="activation",
        metadata={"help": "Importance score: uniform (random), magnitude, wanda, maxip or activation (what each "
                  "unit actually outputs on a token subsample, times its output weights' norm). Default activation: "
                  "on SmolLM2-135M magnitude and wanda picked channels worse than random (docs/journal/benchmarks.md)."},
    )
    selection: str = field(
        default="topk",
        metadata={"help": "topk keeps the highest scores; sampling draws kept units with p ~ score^(1/temperature). "
                  "Default topk: best held-out loss and least forgetting in docs/journal/benchmarks.md."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (> 0): higher is closer to uniform, lower closer to topk."},
    )
    schedule: str = field(
        default="constant",
        metadata={"help": "Omission-rate schedule over training: ladder (LORS, the paper's: ends dense), constant, "
                  "linear or cosine. Default constant: with omit_in backward the forward is dense, so ending dense "
                  "buys nothing (the ladder's dense last steps gained 0.0003-0.001 held-out loss on SmolLM2-135M); "
                  "with forward_backward use ladder, so the trained network ends dense."},
    )
    ladder_sparse_fraction: float = field(
        default=0.75,
        metadata={"help": "Ladder: fraction of total steps spent at the peak omission_rate, in (0, 1); the rest steps down to dense."},
    )
    ladder_num_rungs: int = field(
        default=2,
        metadata={
            "help": "Ladder: number of rungs after the sparse phase, equally long, stepping the rate down "
            "evenly; the last rung is 0 (dense). >= 1."
        },
    )
    ladder_rungs: list[list[float]] | None = field(
        default=None,
        metadata={
            "help": "Ladder: explicit [[start_fraction, rate], ...] overriding the two keys above; "
            "first start 0, starts increasing in [0, 1), rates in [0, 1), last rate 0."
        },
    )
    layer_rates: str = field(
        default="uniform",
        metadata={"help": "uniform: every block's peak rate is omission_rate; auto: a calibration at train start "
                  "(calibration_batches training batches) measures each block's cost at each calibration_rate and "
                  "assigns per-block peak rates that meet rate_budget at the least summed cost (a table in the log and "
                  "in report.json). Cost: the relative loss increase (omit_in forward_backward) or the share of the "
                  "squared gradient norm cut (backward, weight_gradient). dense_layers stays the manual form."},
    )
    rate_budget: str = field(
        default="flops",
        metadata={"help": "layer_rates auto: flops saves as many FLOPs as the uniform omission_rate over the same blocks; "
                  "loss saves the most FLOPs whose summed calibrated cost stays within loss_budget."},
    )
    loss_budget: float = field(
        default=0.01,
        metadata={"help": "layer_rates auto with rate_budget loss: the largest summed cost (> 0), e.g. 0.01 = +1% loss "
                  "(forward_backward) or 1% of the squared gradient norm (backward)."},
    )
    calibration_rates: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        metadata={"help": "layer_rates auto: the rates each block is measured at and may be given (ascending, in (0, 1))."},
    )
    calibration_batches: int = field(
        default=2,
        metadata={"help": "layer_rates auto: training batches the calibration measures on (>= 1)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the selection RNG; draws depend only on (seed, draw number, layer)."},
    )
    draw_every: str = field(
        default="step",
        metadata={"help": "step: one kept set per optimizer step; micro_batch: a new one per micro-batch."},
    )
    omitted_update: str = field(
        default="optimizer",
        metadata={
            "help": "optimizer: omitted rows get zero gradient and the optimizer still moves them (momentum, "
            "weight decay); freeze: their weights are restored after the optimizer step (SATCallback); momentum "
            "(Adam-family optimizers): their gradient is replaced by their own first moment (exp_avg) before the "
            "optimizer step, so they continue their recent direction instead of missing the update. With "
            "sparse_tokens context only optimizer (the loss tokens give the omitted channels real gradients)."
        },
    )
    momentum_decay: float = field(
        default=1.0,
        metadata={
            "help": "omitted_update momentum: each step a slice stays omitted, its first moment is multiplied by this "
            "(in [0, 1]). 1: carried unchanged, so a slice omitted for many steps keeps moving in its last direction; "
            "the optimizer's beta1 (0.9 for AdamW): what omitted_update optimizer does; between: a continued update "
            "that fades, 1 / (1 - momentum_decay) steps' worth in all."
        },
    )
    maxip_tokens: int = field(
        default=64,
        metadata={"help": "maxip: number of tokens subsampled per draw to score neurons (>= 1)."},
    )
    activation_tokens: int = field(
        default=256,
        metadata={"help": "activation: the fewest tokens of the micro-batch subsampled to measure units' outputs "
                  "(>= 1; all tokens if the micro-batch has fewer); see activation_token_fraction."},
    )
    activation_token_fraction: float = field(
        default=0.125,
        metadata={"help": "activation: the subsample is this fraction of the micro-batch's tokens, in (0, 1], when "
                  "that is more than activation_tokens: scoring's share of the step then stays the same at every "
                  "batch size."},
    )
    activation_scores: str = field(
        default="auto",
        metadata={"help": "activation, MLP blocks: subsample: every draw measures every channel on a token subsample of "
                  "the micro-batch about to run (a subsample-sized gate/up forward per block and draw), so the kept set "
                  "follows the current input; forward: the kept channels are scored from the outputs the previous "
                  "training forward computed (no extra matmul) and each draw re-measures only a rotating "
                  "1/remeasure_every of the channels on the subsample. forward is cheaper but its scores are a batch "
                  "or more old: on SmolLM2-135M CPT it cost +1.4-1.7% held-out loss where subsample cost +0.8% "
                  "(docs/journal/benchmarks.md). With omit_in backward or weight_gradient, forward reads this step's own dense "
                  "forward: the kept set is drawn at the down projection from every channel's output on all tokens (no "
                  "subsample, nothing stale) and gate/up read it in backward. auto: forward when the forward is dense "
                  "(omit_in backward, weight_gradient), else subsample. Attention (kv_group units) likewise: with a dense "
                  "forward and forward (or auto) it is drawn at the value projection from every head's values on all "
                  "tokens; otherwise, and for query_head units, scored on the subsample."},
    )
    remeasure_every: int = field(
        default=8,
        metadata={"help": "activation_scores forward: every channel is re-measured on the subsample at least every "
                  "this many draws (>= 1; 1 re-measures all of them each draw, as subsample does). With a dense forward "
                  "every channel is measured each draw; only the down columns' norms are refreshed in these windows."},
    )
    score_every: int = field(
        default=1,
        metadata={"help": "Re-score the units every this many draws (>= 1); draws in between reuse the last scores "
                  "(topk then keeps the same set). Scoring is part of SAT's overhead on a GPU."},
    )
    dense_layers: list[int] = field(
        default_factory=list,
        metadata={"help": "Decoder layers (0-based; negative counts from the last) whose blocks are never omitted, "
                  "e.g. [0, 1, 2, -1] (SparseLoRA keeps the first three and the last layer dense)."},
    )
    dense_warmup_fraction: float = field(
        default=0.375,
        metadata={"help": "Fraction of total steps trained dense before the schedule starts, in [0, 1); the "
                  "schedule runs over the remaining steps. Default 0.375: an omitted update costs most in the first "
                  "steps, where the loss falls fastest and the learning rate is high (SmolLM2-135M CPT, backward 0.5, "
                  "2 seeds: +0.27% held-out loss with 0.375, +0.52% with 0.25 and +1.16% with none, the latter two over "
                  "the ladder); the value itself was tuned on that model only."},
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SATConfig:
        """Build from a mapping, rejecting unknown keys by name."""
        if not isinstance(data, dict):
            raise SATConfigError(f"SAT config must be a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SATConfigError(
                f"unknown SAT config key {unknown[0]!r} (value {data[unknown[0]]!r}); allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SATConfig:
        """Load from a YAML file whose SAT settings are at top level or under a ``sat:`` key."""
        data = load_yaml_file(path) or {}
        if isinstance(data, dict) and "sat" in data:
            data = data["sat"] or {}
        try:
            return cls.from_dict(data)
        except SATConfigError as err:
            raise SATConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def scores_from_forward(self) -> bool:
        """Whether activation MLP scores come from the training forward (activation_scores, auto resolved)."""
        if self.activation_scores == "auto":
            return self.omit_in != "forward_backward"
        return self.activation_scores == "forward"


def to_config(config: Any) -> SATConfig:
    """What ``SATCallback`` and ``apply_sat`` accept: a SATConfig, a mapping of its keys, a YAML
    path, or None (defaults); anything else raises one line saying so."""
    if config is None:
        return SATConfig()
    if isinstance(config, SATConfig):
        return config
    if isinstance(config, Mapping):
        return SATConfig.from_dict(dict(config))
    if isinstance(config, (str, Path)):
        return SATConfig.from_yaml(config)
    raise SATConfigError(
        f"SAT config must be a SATConfig, a mapping of its keys (e.g. {{'omission_rate': 0.5}}), a YAML path or None; "
        f"got {type(config).__name__} {config!r:.60}"
    )


def field_help() -> dict[str, str]:
    """Help text per key, for docs and CLI listings."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(SATConfig)}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise SATConfigError(f"SAT config key {key!r} has invalid value {value!r}; allowed: {allowed}")


def _check_types(cfg: SATConfig) -> None:
    expected: dict[str, tuple[type, ...]] = {
        "omission_rate": (int, float),
        "temperature": (int, float),
        "ladder_sparse_fraction": (int, float),
        "ladder_num_rungs": (int,),
        "seed": (int,),
        "maxip_tokens": (int,),
        "activation_tokens": (int,),
        "activation_token_fraction": (int, float),
        "activation_scores": (str,),
        "remeasure_every": (int,),
        "score_every": (int,),
        "dense_warmup_fraction": (int, float),
        "metric": (str,),
        "selection": (str,),
        "schedule": (str,),
        "draw_every": (str,),
        "omitted_update": (str,),
        "momentum_decay": (int, float),
        "attention_unit": (str,),
        "omit_in": (str,),
        "compensation": (str,),
        "sparse_tokens": (str,),
        "layer_rates": (str,),
        "rate_budget": (str,),
        "loss_budget": (int, float),
        "calibration_batches": (int,),
    }
    for key, types in expected.items():
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, types):
            _fail(key, value, f"a value of type {' or '.join(t.__name__ for t in types)}")
    if isinstance(cfg.targets, str):
        cfg.targets = [cfg.targets]
    if not isinstance(cfg.targets, (list, tuple)) or not all(isinstance(t, str) for t in cfg.targets):
        _fail("targets", cfg.targets, f"a list drawn from {list(TARGETS)}")
    cfg.targets = list(cfg.targets)
    if not isinstance(cfg.dense_layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in cfg.dense_layers):
        _fail("dense_layers", cfg.dense_layers, "a list of layer indices (integers; negative counts from the last layer)")
    cfg.dense_layers = list(cfg.dense_layers)


def _check_values(cfg: SATConfig) -> None:
    if not 0.0 <= cfg.omission_rate < 1.0:
        _fail("omission_rate", cfg.omission_rate, "a number in [0, 1)")
    if not cfg.targets or any(t not in TARGETS for t in cfg.targets) or len(set(cfg.targets)) != len(cfg.targets):
        _fail("targets", cfg.targets, f"a non-empty list without repeats drawn from {list(TARGETS)}")
    for key, allowed in (("metric", METRICS), ("selection", SELECTIONS), ("schedule", SCHEDULES), ("draw_every", DRAW_EVERY), ("omitted_update", OMITTED_UPDATES), ("attention_unit", ATTENTION_UNITS), ("omit_in", OMIT_IN), ("compensation", COMPENSATIONS), ("sparse_tokens", SPARSE_TOKENS), ("layer_rates", LAYER_RATES), ("rate_budget", RATE_BUDGETS), ("activation_scores", ACTIVATION_SCORES)):
        if getattr(cfg, key) not in allowed:
            _fail(key, getattr(cfg, key), ", ".join(allowed))
    if cfg.compensation == "mean" and (cfg.omit_in != "forward_backward" or cfg.metric != "activation"):
        _fail("compensation", cfg.compensation, "none, or mean with omit_in forward_backward (a dense forward has nothing to "
              "compensate) and metric activation (the mean is taken over the channel outputs that metric computes)")
    if cfg.sparse_tokens == "context" and (cfg.targets != ["mlp"] or cfg.compensation != "none"):
        _fail("sparse_tokens", cfg.sparse_tokens, "all, or context with targets [mlp] (attention mixes tokens: a head "
              "cannot be omitted for some tokens only) and compensation none")
    if cfg.sparse_tokens == "context" and cfg.omitted_update != "optimizer":
        _fail("omitted_update", cfg.omitted_update, "optimizer with sparse_tokens context: the loss tokens run every channel, so "
              "the omitted channels' gradients are real (those tokens' share), and freeze or momentum would discard them")
    rates = cfg.calibration_rates
    if not (isinstance(rates, (list, tuple)) and rates and all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < 1 for r in rates)
            and all(a < b for a, b in zip(rates, rates[1:]))):
        _fail("calibration_rates", rates, "a non-empty ascending list of rates in (0, 1)")
    cfg.calibration_rates = [float(r) for r in rates]
    if not cfg.loss_budget > 0:
        _fail("loss_budget", cfg.loss_budget, "a number > 0")
    if cfg.calibration_batches < 1:
        _fail("calibration_batches", cfg.calibration_batches, "an integer >= 1")
    if cfg.layer_rates == "auto" and cfg.omission_rate == 0:
        _fail("layer_rates", cfg.layer_rates, "uniform, or auto with omission_rate > 0 (the schedule scales each block's peak rate by rate(t) / omission_rate)")
    if not 0.0 <= cfg.momentum_decay <= 1.0:
        _fail("momentum_decay", cfg.momentum_decay, "a number in [0, 1]")
    if cfg.momentum_decay != 1.0 and cfg.omitted_update != "momentum":
        _fail("momentum_decay", cfg.momentum_decay, "1 unless omitted_update is momentum (it scales that mode's continued first moment)")
    if not cfg.temperature > 0:
        _fail("temperature", cfg.temperature, "a number > 0")
    if not 0.0 < cfg.ladder_sparse_fraction < 1.0:
        _fail("ladder_sparse_fraction", cfg.ladder_sparse_fraction, "a number in (0, 1)")
    if cfg.ladder_num_rungs < 1:
        _fail("ladder_num_rungs", cfg.ladder_num_rungs, "an integer >= 1")
    if not 0.0 < cfg.activation_token_fraction <= 1.0:
        _fail("activation_token_fraction", cfg.activation_token_fraction, "a number in (0, 1]")
    for key in ("maxip_tokens", "activation_tokens", "score_every", "remeasure_every"):
        if getattr(cfg, key) < 1:
            _fail(key, getattr(cfg, key), "an integer >= 1")
    if not 0.0 <= cfg.dense_warmup_fraction < 1.0:
        _fail("dense_warmup_fraction", cfg.dense_warmup_fraction, "a number in [0, 1)")
    if cfg.ladder_rungs is not None:
        _check_rungs(cfg.ladder_rungs)


def _check_rungs(rungs: Any) -> None:
    allowed = "a list of [start_fraction, rate] pairs, first start 0, starts increasing in [0, 1), rates in [0, 1), last rate 0"
    ok = isinstance(rungs, (list, tuple)) and len(rungs) > 0
    ok = ok and all(
        isinstance(r, (list, tuple))
        and len(r) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
        for r in rungs
    )
    if ok:
        starts = [float(r[0]) for r in rungs]
        rates = [float(r[1]) for r in rungs]
        ok = (
            starts[0] == 0.0
            and all(0.0 <= s < 1.0 for s in starts)
            and all(a < b for a, b in zip(starts, starts[1:]))
            and all(0.0 <= r < 1.0 for r in rates)
            and rates[-1] == 0.0
        )
    if not ok:
        _fail("ladder_rungs", rungs, allowed)
