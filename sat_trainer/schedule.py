"""Omission-rate schedules: pure functions of (config, step, total steps).

``ladder`` is the paper's Ladder Omission Rate Scheduler (LORS): a sparse phase at the peak rate,
then rungs stepping the rate down to 0 so training ends dense. Its exact values are not public;
ours are configurable (``ladder_sparse_fraction``, ``ladder_num_rungs`` or explicit
``ladder_rungs``). The rate is piecewise constant, so the kept count k, and with it every sliced
shape, changes only at rung edges (what ``torch.compile`` needs).
"""

from __future__ import annotations

import math

from .config import SATConfig


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
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 to schedule the omission rate, got {total_steps}")
    warmup = math.floor(cfg.dense_warmup_fraction * total_steps)
    if step < warmup:
        return 0.0
    step, total_steps = step - warmup, total_steps - warmup
    progress = min(max(step / (total_steps - 1), 0.0), 1.0) if total_steps > 1 else 1.0
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


def kept_count(n: int, rate: float) -> int:
    """k = round((1 - rate) * n), at least 1 (half rounds up, unlike Python's banker's round)."""
    return max(1, min(n, math.floor((1.0 - rate) * n + 0.5)))
