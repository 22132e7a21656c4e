"""Interleaved step times: the speed side of `sat-train --compare-dense`, measured so that machine drift cancels.

Two training runs made one after the other see different machine load, and on a shared machine
the difference between them can exceed what SAT saves at a quality-safe rate (docs/journal/benchmarks.md
has the record). So the comparison also times training steps of the dense model and of SAT at each rate of SAT's schedule
*in one process, in turn* (one step of each per round, the order rotating every round), on one
batch of the run's own training data: a load change then hits every variant alike. Dense's time
is its median step; SAT's at a rate is dense's median times the median over rounds of SAT's step
over dense's step of the same round (:func:`paired_ratio`). A schedule's train-step time is the sum
of its steps' times (:meth:`StepTimes.schedule_time`), which is what sizes the equal-time run and
what the table reports beside the as-run times.

Under ``schedule: est`` a step has one rate per target (:func:`~sat_trainer.schedule.step_rates`): each distinct
stage's rates are timed as one variant, keyed by :func:`rate_key` (a stage whose rates are all 0 is dense's), and a
curve is re-timed stage by stage at those times (no interpolation between stages: each is measured).

A timed step is what the Trainer does per optimizer step: ``gradient_accumulation_steps``
forward/backward passes (under the run's bf16/fp16 autocast and gradient checkpointing), then
the optimizer the run's ``TrainingArguments`` name, with SAT's part of the step driven as in training
(:class:`~sat_trainer.step_driver.StepDriver`: draws, ``omitted_update``). It runs in a single process on the run's
device; data loading, logging and distributed communication are not timed (the same for both),
nor is ``torch_compile`` applied (a compiled model recompiles at each new kept count, which
alternating rates would hit every step).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar, Union

import torch

from ..config import SATConfig
from ..errors import SATError
from ..schedule import step_rates

logger = logging.getLogger("sat_trainer")

T = TypeVar("T")
MAX_TIMED_RATES = 4  # a schedule with more distinct rates (linear, cosine) is timed at this many, interpolated between
Rates = Union[float, Mapping[str, float]]  # a step's omission rate, or one per target (schedule est)
RateKey = Union[float, str]  # what StepTimes' tables are keyed by: a rate, or a stage's rates (rate_key)


def rate_key(rates: Rates | RateKey) -> RateKey:
    """The table key of a step's rates: one rate as a float; per-target rates as ``"attention=0.5,layers=0.5,mlp=0.5"``
    (targets sorted), or 0.0 when every target's rate is 0 (that step is dense's); a key is its own."""
    if isinstance(rates, str):
        return rates
    if not isinstance(rates, Mapping):
        return float(rates)
    if not any(rates.values()):
        return 0.0
    return ",".join(f"{target}={rate:g}" for target, rate in sorted(rates.items()))


def key_rates(key: RateKey) -> Rates:
    """What :meth:`~sat_trainer.step_driver.StepDriver.begin_step` takes for a table key (:func:`rate_key`'s inverse)."""
    if isinstance(key, str):
        return {target: float(rate) for target, rate in (item.split("=") for item in key.split(","))}
    return key


def interleaved(steps: dict[str, Callable[[], T]], warmup: int, rounds: int) -> dict[str, list[T]]:
    """Run every step once per round, ``warmup`` rounds untimed then ``rounds`` timed; each callable
    returns its own timing (seconds, or what ``scripts/benchmark.py`` splits them into). The order
    rotates by one each round, so no variant always runs right after the same other one (a step can
    leave caches or the allocator warm for the next)."""
    names = list(steps)
    times: dict[str, list[T]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = steps[name]()
            if i >= warmup:
                times[name].append(elapsed)
    return times


def timed_rates(cfg: SATConfig, steps: int) -> list[RateKey]:
    """The omission rates to time for a ``steps``-step run of ``cfg``'s schedule: each distinct rate
    (a ladder has a few), or, for a schedule with more, :data:`MAX_TIMED_RATES` evenly spaced from 0
    to the peak (step time is close to linear in the kept FLOPs, so interpolation between them is fair).
    Under schedule est: each distinct stage's rates (:func:`rate_key`), every one of them (a run has few stages)."""
    keys = {rate_key(step_rates(cfg, s, steps)) for s in range(steps)}
    if cfg.schedule == "est":
        return sorted(keys, key=lambda k: (isinstance(k, str), k))
    rates = sorted(keys)
    if len(rates) <= MAX_TIMED_RATES:
        return rates
    top = rates[-1]
    return [top * i / (MAX_TIMED_RATES - 1) for i in range(MAX_TIMED_RATES)]


@dataclass
class StepTimes:
    """Seconds per optimizer step: ``dense_s`` for the dense model (a median), ``sat_s[rate]`` for SAT
    at each timed rate (rate 0 is dense's; under schedule est each stage's :func:`rate_key`); ``kept_flops[rate]``
    is SAT's matmul FLOP fraction there (the FLOP ideal)."""

    dense_s: float
    sat_s: dict[RateKey, float]
    kept_flops: dict[RateKey, float] = field(default_factory=dict)
    rounds: int = 0  # timed rounds (0: medians taken elsewhere, e.g. scripts/benchmark.py rows)
    samples: dict[str, list[float]] = field(default_factory=dict)  # variant -> its timed steps' seconds, round by round

    def at(self, rate: Rates) -> float:
        """SAT's step time at ``rate``, linearly interpolated between the timed rates (a stage's rates: its own time)."""
        return _interpolate(self.sat_s, rate)

    def schedule_time(self, cfg: SATConfig, steps: int) -> float:
        """Train-step seconds of a ``steps``-step SAT run: the sum of its scheduled steps' times."""
        return self.curve_time(cfg, steps, steps)

    def schedule_ideal(self, cfg: SATConfig, steps: int) -> float:
        """The FLOP ideal of the same run: dense FLOPs over the schedule's summed kept FLOPs."""
        return steps / sum(_interpolate(self.kept_flops, step_rates(cfg, s, steps)) for s in range(steps))

    def equal_time_steps(self, cfg: SATConfig, dense_steps: int) -> int:
        """The most SAT steps (its schedule over them) whose train-step time fits in ``dense_steps``
        dense steps' (at least 1)."""
        budget = dense_steps * self.dense_s * (1 + 1e-9)  # a sum that equals the budget (to rounding) fits
        steps = max(1, int(budget / max(self.sat_s.values())))  # every step is at most the slowest rate's
        while self.schedule_time(cfg, steps + 1) <= budget:
            steps += 1
        return steps

    def curve_time(self, cfg: SATConfig, total_steps: int, step: int) -> float:
        """Train-step seconds after the first ``step`` steps of a ``total_steps``-step SAT run."""
        return sum(self.at(step_rates(cfg, s, total_steps)) for s in range(step))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``step_times.json``); rates become string keys (a stage's rates already are one)."""
        return {
            "rounds": self.rounds,
            "dense_s": self.dense_s,
            "sat_s": {str(r): t for r, t in self.sat_s.items()},
            "kept_flops": {str(r): f for r, f in self.kept_flops.items()},
            "samples": self.samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepTimes:
        return cls(
            dense_s=data["dense_s"],
            sat_s={_parse_key(r): t for r, t in data["sat_s"].items()},
            kept_flops={_parse_key(r): f for r, f in data["kept_flops"].items()},
            rounds=data["rounds"],
            samples=data["samples"],
        )


def _parse_key(text: str) -> RateKey:
    """A ``step_times.json`` key back into a table key: a rate's number, or a stage's rates as written."""
    try:
        return float(text)
    except ValueError:
        return text


def _interpolate(points: dict[RateKey, float], rate: Rates) -> float:
    """``points[rate]``, linear between the nearest measured rates; a rate outside them is an error
    (a time made up beyond what was measured would be a claim nobody measured). A stage's rates (a string key)
    are looked up exactly: a stage that was not timed is an error too."""
    key = rate_key(rate)
    if isinstance(key, str):
        if key not in points:
            measured = ", ".join(str(k) for k in points if isinstance(k, str)) or "none"
            raise SATError(f"no step time measured at the stage rates {key} (measured stages: {measured})")
        return points[key]
    rate = key
    rates = sorted(k for k in points if not isinstance(k, str))
    if not rates[0] - 1e-9 <= rate <= rates[-1] + 1e-9:
        raise SATError(f"no step time measured around omission rate {rate:g} (measured: {', '.join(f'{r:g}' for r in rates)})")
    for lo, hi in zip(rates, rates[1:]):
        if rate <= hi:
            return points[lo] + (points[hi] - points[lo]) * (rate - lo) / (hi - lo)
    return points[rates[-1]]


def measure(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    args,
    cfg: SATConfig,
    rates: list[RateKey],
    *,
    calibration: dict | None = None,
    warmup: int = 1,
    rounds: int = 5,
) -> StepTimes:
    """Time dense and SAT training steps on ``batch``, interleaved (see the module docstring).

    ``model`` (LoRA applied if the run has it) is loaded for this: it is patched with ``cfg`` (and
    ``calibration``'s per-block rates, ``layer_rates: auto``), trained with one optimizer of the run's
    kind, and unpatched at the end. Dense is the same model at rate 0, where every projection runs
    its own forward behind a thin wrapper (no draw, no scoring, no slicing): one model in memory, as
    in training (two copies with two optimizers would not fit where a model barely does), and no
    difference between the two variants but the omission.
    """
    from ..calibration import apply_table
    from ..patch.model import apply_sat, remove_sat
    from ..step_driver import StepDriver

    if args.torch_compile:
        logger.warning(
            "sat_trainer: the interleaved step timing runs the model uncompiled (training.torch_compile is not applied to it)"
        )
    device = args.device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    model = model.to(device).train()
    handle = apply_sat(model, cfg)
    if calibration is not None:
        apply_table(handle, calibration)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    driver = StepDriver(handle, cfg)
    train_step = _trainer_step(model, batch, args, driver)
    kept: dict[RateKey, float] = {0.0: 1.0}

    def at_rate(key: RateKey) -> Callable[[], float]:
        def step() -> float:
            driver.begin_step(key_rates(key))
            elapsed = train_step()
            kept[key] = handle.kept_flops_fraction()
            return elapsed

        return step

    sparse = [k for k in map(rate_key, rates) if k != 0.0]
    steps = {"dense": at_rate(0.0), **{f"sat@{_label(k)}": at_rate(k) for k in sparse}}
    logger.info(
        "sat_trainer: timing dense and SAT at rates %s interleaved, %d rounds of %d steps (+%d warm-up)",
        "; ".join(_label(k) for k in sparse),
        rounds,
        len(steps),
        warmup,
    )
    try:
        times = interleaved(steps, warmup, rounds)
    finally:
        remove_sat(model)
    dense_s = statistics.median(times["dense"])
    return StepTimes(
        dense_s=dense_s,
        sat_s={0.0: dense_s, **{k: dense_s * paired_ratio(times[f"sat@{_label(k)}"], times["dense"]) for k in sparse}},
        kept_flops=kept,
        rounds=rounds,
        samples=times,
    )


def _label(key: RateKey) -> str:
    return key if isinstance(key, str) else f"{key:g}"


def paired_ratio(sat: list[float], dense: list[float]) -> float:
    """The median over rounds of SAT's step time over dense's in the same round: a load change
    that lasts longer than a round cancels in each ratio, which a ratio of the two medians would
    mix with the change itself (the ratios farm-bench reports, pair by pair)."""
    return statistics.median(s / d for s, d in zip(sat, dense))


def _trainer_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], args, driver) -> Callable[[], float]:
    """One optimizer step as the Trainer takes it (see the module docstring), with SAT's part of it
    after the step's :meth:`~sat_trainer.step_driver.StepDriver.begin_step` (``driver``: draws per
    micro-batch, ``omitted_update`` around the optimizer step), returning its seconds."""
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    accumulation = max(1, args.gradient_accumulation_steps)
    device_type = torch.device(args.device).type
    precision = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None

    def step() -> float:
        _sync(device_type)
        start = time.perf_counter()
        for i in range(accumulation):
            amp = torch.autocast(device_type, dtype=precision) if precision is not None else contextlib.nullcontext()
            with amp:
                loss = model(**batch).loss / accumulation
            loss.backward()
            if i < accumulation - 1:
                driver.micro_batch_done()
        driver.before_optimizer_step(optimizer)
        optimizer.step()
        driver.after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device_type)
        return time.perf_counter() - start

    return step


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()
