"""Omission-rate schedules: pure functions of (config, step, total steps).

``ladder`` is the paper's Ladder Omission Rate Scheduler (LORS): a sparse phase at the peak rate,
then rungs stepping the rate down to 0 so training ends dense. Its exact values are not public;
ours are configurable (``ladder_sparse_fraction``, ``ladder_num_rungs`` or explicit
``ladder_rungs``). The rate is piecewise constant, so the kept count k, and with it every sliced
shape, changes only at rung edges (what ``torch.compile`` needs).

``est`` is EST's staged schedule (Evolving Subnetwork Training): each stage of ``est_stages`` keeps its own
fraction of the decoder layers, attention heads and MLP channels, so it gives each target its own rate
(:func:`axis_rates_at`); :func:`step_rates` is what a step driver takes for any schedule.
"""

from __future__ import annotations

import math

from .config import EST_AXES, SATConfig


def ladder_rungs(cfg: SATConfig) -> list[tuple[float, float]]:
    """The ladder as [(start_fraction, rate), ...]: explicit, or derived from the peak rate.

    Derived: the peak rate from 0 to ``ladder_sparse_fraction``; the rest split into
    ``ladder_num_rungs`` equal rungs at peak*(n-1)/n, ..., peak/n, 0.
    """
    if cfg.ladder_rungs is not None:
        return [(float(s), float(r)) for s, r in cfg.ladder_rungs]
    n, peak, sparse = cfg.ladder_num_rungs, cfg.omission_rate, cfg.ladder_sparse_fraction
    width = (1.0 - sparse) / n
    return [(0.0, peak)] + [(sparse + i * width, peak * (n - 1 - i) / n) for i in range(n)]


def omission_rate_at(cfg: SATConfig, step: int, total_steps: int) -> float:
    """Omission rate for optimizer step ``step`` (0-based) of ``total_steps``.

    The first ``dense_warmup_fraction`` of the steps are dense; over the rest, progress runs from
    0 at the first step to 1 at the last, so the last step always gets the schedule's final value (0 for ladder, linear and cosine: training ends dense), however few
    steps there are.
    """
    if cfg.schedule == "est":
        raise ValueError("schedule est gives each target its own rate: use axis_rates_at or step_rates, not omission_rate_at")
    progress = _progress(cfg, step, total_steps)
    if progress is None:
        return 0.0
    peak = cfg.omission_rate
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "linear":
        return peak * (1.0 - progress)
    if cfg.schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    rate = 0.0
    for start, rung_rate in ladder_rungs(cfg):
        if progress >= start:
            rate = rung_rate
    return rate


def axis_rates_at(cfg: SATConfig, step: int, total_steps: int) -> dict[str, float]:
    """schedule est: each target's omission rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Dense (every rate 0) for the first ``dense_warmup_fraction`` of the steps; over the rest, progress runs as in
    :func:`omission_rate_at` and stage i holds from the sum of the fractions before it, so the last step is in the
    last stage. A stage's rate for a target is 1 minus its keep fraction of that target's axis (``EST_AXES``).

    Returns:
        {target: rate} for every target of ``cfg.targets``.
    """
    stage = est_stage_at(cfg, step, total_steps)
    keeps = {target: 1.0 if stage is None else stage[axis] for axis, target in EST_AXES.items()}
    return {target: 1.0 - keeps[target] for target in cfg.targets}


def est_stage_at(cfg: SATConfig, step: int, total_steps: int) -> dict[str, float] | None:
    """schedule est: the stage of ``est_stages`` that step ``step`` of ``total_steps`` is in (None: the dense start)."""
    progress = _progress(cfg, step, total_steps)
    if progress is None:
        return None
    start, current = 0.0, cfg.est_stages[0]
    for stage in cfg.est_stages:
        if progress >= start - 1e-9:  # fractions sum in floating point: a boundary step belongs to the later stage
            current = stage
        start += stage["fraction"]
    return current


def step_rates(cfg: SATConfig, step: int, total_steps: int) -> float | dict[str, float]:
    """What :meth:`~sat_trainer.step_driver.StepDriver.begin_step` takes for step ``step``: one rate for every
    target (:func:`omission_rate_at`), or under schedule est one per target (:func:`axis_rates_at`)."""
    if cfg.schedule == "est":
        return axis_rates_at(cfg, step, total_steps)
    return omission_rate_at(cfg, step, total_steps)


def _progress(cfg: SATConfig, step: int, total_steps: int) -> float | None:
    """Where ``step`` lies in the scheduled steps after the dense start, from 0 at the first to 1 at the last;
    None in the dense start."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 to schedule the omission rate, got {total_steps}")
    warmup = math.floor(cfg.dense_warmup_fraction * total_steps)
    if step < warmup:
        return None
    step, total_steps = step - warmup, total_steps - warmup
    return min(max(step / (total_steps - 1), 0.0), 1.0) if total_steps > 1 else 1.0


def kept_count(n: int, rate: float) -> int:
    """k = round((1 - rate) * n), at least 1 (half rounds up, unlike Python's banker's round)."""
    return max(1, min(n, math.floor((1.0 - rate) * n + 0.5)))
