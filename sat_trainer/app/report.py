"""What every `sat-train` run leaves behind: ``report.json``, ``report.png`` (drawn by :mod:`.plots`), the dense comparison table.

:class:`ReportCallback` records, per optimizer step, the time spent inside training steps (so
evaluation pauses do not count against throughput), tokens seen, the omission rate, and every
logged train/held-out loss (the curves' points, and apart from them the final whole-set held-out
losses that :mod:`.run` evaluates when the curves use a subset). The report is written from that record alone. The record is saved
in every Trainer checkpoint (``ExportableState``), so a resumed run's report covers the whole run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..patch.model import handle_of
from .plots import plot_comparison, plot_report

if TYPE_CHECKING:
    from ..config import SATConfig
    from .step_timing import StepTimes


FULL_EVAL_PREFIX = "whole"  # the Trainer's metric prefix of the final evaluation on the whole held-out sets


class ReportCallback(TrainerCallback, ExportableState):
    """Collects the per-step record a report is made of."""

    def __init__(self):
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.losses: list[dict[str, Any]] = []
        self.final_held_out: dict[str, Any] = {}  # {"step": n, set: loss} on the whole sets, when the curves use a subset
        self.train_time = 0.0
        self.wall_time_before = 0.0  # wall seconds of the sessions before a resume
        self._session_start = time.perf_counter()
        self._step_start = 0.0
        self._model = None

    def state(self) -> dict:
        attributes = ("steps", "evals", "losses", "final_held_out", "train_time")
        return {"args": {}, "attributes": {**{a: getattr(self, a) for a in attributes}, "wall_time_before": self.wall_time()}}

    def wall_time(self) -> float:
        """Wall seconds of the run so far, resumed sessions included."""
        return self.wall_time_before + time.perf_counter() - self._session_start

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model
        self._session_start = time.perf_counter()
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if state.global_step > 0 and not self.steps and isinstance(saved, dict):  # resumed: continue the record
            for key, value in saved["attributes"].items():
                setattr(self, key, value)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True  # the final train loss is logged even when max_steps < logging_steps
        self.train_time += time.perf_counter() - self._step_start
        handle = handle_of(self._model) if self._model is not None else None
        self.steps.append(
            {
                "step": state.global_step,
                "train_time_s": self.train_time,
                "tokens": int(state.num_input_tokens_seen),
                "omission_rate": handle.rate if handle is not None else 0.0,
            }
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            self.losses.append({"step": state.global_step, "train_time_s": self.train_time, "loss": logs["loss"]})
        held_out = _losses(logs, "eval")
        whole = _losses(logs, FULL_EVAL_PREFIX)
        if whole:
            self.final_held_out = {**self.final_held_out, "step": state.global_step, **whole}
        if held_out and self.evals and self.evals[-1]["step"] == state.global_step:
            self.evals[-1].update(held_out)  # the Trainer logs each held-out set of a step separately
        elif held_out:
            self.evals.append({"step": state.global_step, "train_time_s": self.train_time, **held_out})


def build_report(
    record: ReportCallback, *, mode: str, config: dict, wall_time_s: float, status: str = "completed", **extra: Any
) -> dict[str, Any]:
    """The ``report.json`` content of one run; ``status`` is "completed" or "diverged"."""
    steps = record.steps
    tokens = steps[-1]["tokens"] if steps else 0
    final_eval = record.final_held_out or (record.evals[-1] if record.evals else {})
    return {
        "mode": mode,
        "status": status,
        **extra,
        "steps": len(steps),
        "wall_time_s": round(wall_time_s, 3),
        "train_time_s": round(record.train_time, 3),
        "tokens": tokens,
        "tokens_per_second": round(tokens / record.train_time, 2) if record.train_time else None,
        "final_train_loss": record.losses[-1]["loss"] if record.losses else None,
        "held_out_loss": {k: v for k, v in final_eval.items() if k not in ("step", "train_time_s")},
        "curve_eval_samples": config.get("data", {}).get("curve_eval_samples") if record.final_held_out else None,
        "omission_schedule": [s["omission_rate"] for s in steps],
        "history": {"steps": steps, "train_loss": record.losses, "held_out": record.evals},
        "config": config,
    }


def _losses(logs: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{set: loss}`` from the Trainer's ``<prefix>_<set>_loss`` log keys."""
    return {k[len(prefix) + 1 : -len("_loss")]: v for k, v in logs.items() if k.startswith(prefix + "_") and k.endswith("_loss")}


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """``report.json`` (strict JSON: a NaN or infinite loss is written as null) and ``report.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False))
    plot_report(report, out_dir / "report.png")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


AS_RUN = "as run, includes the machine's load"


def step_clock(report: dict[str, Any], times: StepTimes, sat: SATConfig, *, dense: bool) -> Callable[[int], float]:
    """Re-timed train-step seconds after the first ``n`` steps of ``report``'s run: dense's median step
    times ``n`` for the dense run, the sum of its scheduled steps' interleaved times for a SAT run
    (:meth:`StepTimes.curve_time`). Unlike a run's own clock, this one carries no machine load."""
    if dense:
        return lambda n: n * times.dense_s
    return lambda n: times.curve_time(sat, report["steps"], n)


def retimed(report: dict[str, Any], clock: Callable[[int], float]) -> dict[str, Any]:
    """``report`` with every ``train_time_s`` of its history (steps, training and held-out losses) read off ``clock``."""
    history = {key: [{**row, "train_time_s": clock(row["step"])} for row in rows] for key, rows in report["history"].items()}
    return {**report, "history": history, "train_time_s": clock(report["steps"])}


# An interleaved speedup this far above the FLOP ideal is not SAT's: the rounds' load changed.
NOISE_OVER_IDEAL = 1.05


def comparison(
    dense: dict[str, Any], runs: list[tuple[str, dict[str, Any]]], times: StepTimes | None = None, sat: SATConfig | None = None
) -> dict[str, Any]:
    """The headline numbers of the dense run and SAT runs of one config (``compare.json``), one entry per run, dense first.

    With ``times`` (the interleaved step times, :mod:`.step_timing`) and SAT's config ``sat``, every
    speed number is on the interleaved clock: a run's step time (its schedule's mean), the speedup per
    step, the FLOP ideal of the same schedule, its re-timed train-step time, and the time to dense's
    final held-out loss on the first set (the config's target domain) read off its curve re-timed at
    those times (:func:`time_to_reach`). Without them (``--timing-rounds 0``) the speed numbers are
    the runs' own clocks, taken one run after the other, and say so (``timing: "as run"``). The
    target is dense's last point on the curve (the curve's own held-out subset, see
    ``data.curve_eval_samples``); the held-out losses are on the whole sets. Each run's wall time,
    as run, is kept under ``wall_time_as_run_s``: it includes the machine's load."""
    first = next(iter(dense["held_out_loss"]), None)  # the config's first held-out set: the target domain
    curve_end = dense["history"]["held_out"][-1] if dense["history"]["held_out"] else {}
    target = curve_end.get(first, dense["held_out_loss"].get(first)) if first is not None else None
    curves = comparison_curves(dense, runs, times, sat)
    dense_time = curves[0][1]["train_time_s"]
    rows = []
    for i, ((label, r), (_, curve)) in enumerate(zip([("dense", dense), *runs], curves)):
        train_time = curve["train_time_s"]
        reach = time_to_reach(curve["history"]["held_out"], first, target) if first is not None else None
        row = {
            "label": label,
            "steps": r["steps"],
            "step_time_s": train_time / r["steps"] if r["steps"] else None,
            "train_step_time_s": train_time,
            "speedup_per_step": dense_time / dense["steps"] / (train_time / r["steps"]) if r["steps"] and train_time else None,
            "held_out_loss": r["held_out_loss"],
            "held_out_vs_dense": {
                n: r["held_out_loss"][n] / loss - 1
                for n, loss in dense["held_out_loss"].items()
                if r["held_out_loss"].get(n) is not None and loss
            },
            "time_to_dense_loss": reach / dense_time if reach is not None and dense_time else None,
            "wall_time_as_run_s": r["wall_time_s"],
        }
        if r.get("lte") is not None:
            row["lte_mlp_fraction"] = {n: v["mlp_fraction"] for n, v in r["lte"]["held_out"].items()}
        if times is not None:
            row["flop_ideal"] = times.schedule_ideal(sat, r["steps"]) if i else 1.0
        rows.append(row)
    return {
        "timing": "interleaved" if times is not None else "as run",
        "target": {"held_out_set": first, "dense_loss": target},
        "curve_eval_samples": dense.get("curve_eval_samples"),
        "runs": rows,
    }


def comparison_table(
    dense: dict[str, Any],
    runs: list[tuple[str, dict[str, Any]]],
    times: StepTimes | None = None,
    sat: SATConfig | None = None,
) -> str:
    """Markdown table of :func:`comparison`, one column per run (dense first), and below it the runs'
    wall times as run, labelled as the machine's load they include.

    Headline rows: steps; with ``times``, the interleaved step time, speedup per step, FLOP ideal and
    re-timed train-step time; the held-out losses, for an LTE run the MLP neurons it computes per token (stage
    hard, its report's ``lte`` entry), and each loss against dense's; the time to dense's final
    loss on the re-timed curve. Without ``times`` the speed rows are the runs' own clocks, labelled as run."""
    numbers = comparison(dense, runs, times, sat)
    cols = numbers["runs"]
    cells: dict[str, list[str]] = {"steps": [str(c["steps"]) for c in cols]}

    def row(name: str, cell: Callable[[dict], str]) -> None:
        cells[name] = [cell(c) for c in cols]

    if times is not None:
        row("step time, interleaved (s)", lambda c: f"{c['step_time_s']:.3f}")
        row("speedup per step, interleaved", lambda c: _times(c["speedup_per_step"]))
        row("FLOP ideal, same schedule", lambda c: _times(c["flop_ideal"]))
        row("train-step time, re-timed (s)", lambda c: f"{c['train_step_time_s']:.1f}")
    else:
        row(f"train-step time, {AS_RUN} (s)", lambda c: f"{c['train_step_time_s']:.1f}")
        row(f"speedup per step, {AS_RUN}", lambda c: _times(c["speedup_per_step"]))
    for name in dense["held_out_loss"]:  # the config's order: the target domain first
        row(f"held-out loss: {name}", lambda c, n=name: f"{c['held_out_loss'].get(n, float('nan')):.4f}")
    if any("lte_mlp_fraction" in c for c in cols):  # an LTE run: the neurons it computes against dense's all
        for name in dense["held_out_loss"]:
            row(
                f"MLP neurons computed per token, held-out: {name}",
                lambda c, n=name: _percent(c.get("lte_mlp_fraction", {}).get(n)) if c is not cols[0] else "100%",
            )
    for name in dense["held_out_loss"]:
        row(
            f"held-out loss vs dense: {name}",
            lambda c, n=name: (
                "" if c is cols[0] else f"{100 * c['held_out_vs_dense'][n]:+.2f}%" if n in c["held_out_vs_dense"] else "-"
            ),
        )
    first = numbers["target"]["held_out_set"]
    if first is not None:
        retimed_or_as_run = "re-timed" if times is not None else AS_RUN
        row(
            f"train-step time to dense's final {first} loss, {retimed_or_as_run}",
            lambda c: _times(c["time_to_dense_loss"]) if c["time_to_dense_loss"] is not None else "not reached",
        )
    head = "| | " + " | ".join(c["label"] for c in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols), *[f"| {name} | " + " | ".join(c) + " |" for name, c in cells.items()]]
    lines.append("")
    lines.append(
        f"wall time {AS_RUN} (s): "
        + ", ".join(f"{c['label']} {c['wall_time_as_run_s']:.1f}" for c in cols)
        + (" (the runs ran one after the other; speed is compared on the interleaved times above)" if times else "")
    )
    for c in cols[1:] if times is not None else []:
        if c["speedup_per_step"] and c["flop_ideal"] and c["speedup_per_step"] > NOISE_OVER_IDEAL * c["flop_ideal"]:
            lines.append(
                f"note: {c['label']} ran {_times(c['speedup_per_step'])} per step, above its FLOP ideal "
                f"{_times(c['flop_ideal'])}: the interleaved rounds were noisy (the machine's load changed within them); "
                "rerun on a quiet machine or with more --timing-rounds before trusting the speed rows"
            )
    if numbers["curve_eval_samples"]:
        lines.append(
            f"held-out curves and the time to dense's loss: {numbers['curve_eval_samples']} blocks or records of each "
            "held-out set per point; held-out loss rows: the whole sets"
        )
    if times is None:
        lines.append(f"speed rows: each run's own clock, one run after the other ({AS_RUN}; --timing-rounds 0)")
    return "\n".join(lines)


def comparison_curves(
    dense: dict[str, Any], runs: list[tuple[str, dict[str, Any]]], times: StepTimes | None = None, sat: SATConfig | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The runs as ``report.png`` draws them, dense first: with ``times``, every curve on the re-timed
    clock (:func:`step_clock`), so that a load change between the runs does not move them apart;
    without, on each run's own clock."""
    everything = [("dense", dense), *runs]
    if times is None:
        return everything
    return [(label, retimed(r, step_clock(r, times, sat, dense=i == 0))) for i, (label, r) in enumerate(everything)]


def write_comparison(
    out_dir: Path,
    dense: dict[str, Any],
    runs: list[tuple[str, dict[str, Any]]],
    times: StepTimes | None = None,
    sat: SATConfig | None = None,
) -> str:
    """``compare.md`` (:func:`comparison_table`), ``compare.json`` (:func:`comparison`) and ``report.png``
    (:func:`comparison_curves`) in ``out_dir``; returns the table."""
    table = comparison_table(dense, runs, times, sat)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.md").write_text(table + "\n")
    (out_dir / "compare.json").write_text(json.dumps(_finite(comparison(dense, runs, times, sat)), indent=2, allow_nan=False))
    xlabel = "train-step time, re-timed at the interleaved step times (s)" if times else f"time in training steps, {AS_RUN} (s)"
    plot_comparison(comparison_curves(dense, runs, times, sat), out_dir / "report.png", xlabel=xlabel)
    return table


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def _times(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def equal_time_steps(dense: dict[str, Any], sat: dict[str, Any]) -> int:
    """The SAT steps that fit in dense's train-step time, at SAT's own time per step in its equal-steps run."""
    return max(1, int(dense["train_time_s"] * sat["steps"] / sat["train_time_s"]))


def time_to_reach(evals: list[dict[str, Any]], name: str, target: float) -> float | None:
    """Train-step time at which held-out loss ``name`` first reaches ``target``, read off the curve:
    linearly interpolated between the last evaluation above it and the first at or below it; None
    if no evaluation reaches it."""
    points = [(e["train_time_s"], e[name]) for e in evals if name in e]
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = points[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None
