"""What every `sat-train` run leaves behind: ``report.json``, ``report.png`` (drawn by :mod:`.plots`), the dense comparison table.

:class:`ReportCallback` records, per optimizer step, the time spent inside training steps (so
evaluation pauses do not count against throughput), tokens seen, the omission rate, and every
logged train/held-out loss. The report is written from that record alone. The record is saved
in every Trainer checkpoint (``ExportableState``), so a resumed run's report covers the whole run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..patch.model import handle_of
from .plots import plot_report

if TYPE_CHECKING:
    from ..config import SATConfig
    from .step_timing import StepTimes


class ReportCallback(TrainerCallback, ExportableState):
    """Collects the per-step record a report is made of."""

    def __init__(self):
        self.steps: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.losses: list[dict[str, Any]] = []
        self.train_time = 0.0
        self.wall_time_before = 0.0  # wall seconds of the sessions before a resume
        self._session_start = time.perf_counter()
        self._step_start = 0.0
        self._model = None

    def state(self) -> dict:
        attributes = ("steps", "evals", "losses", "train_time")
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
        held_out = {k[len("eval_") : -len("_loss")]: v for k, v in logs.items() if k.startswith("eval_") and k.endswith("_loss")}
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
    final_eval = record.evals[-1] if record.evals else {}
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
        "omission_schedule": [s["omission_rate"] for s in steps],
        "history": {"steps": steps, "train_loss": record.losses, "held_out": record.evals},
        "config": config,
    }


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


def comparison_table(
    dense: dict[str, Any], runs: list[tuple[str, dict[str, Any]]], times: StepTimes | None = None, sat: SATConfig | None = None,
) -> str:
    """Markdown table of the dense run and SAT runs of the same config side by side, one column each.

    The as-run times are each run's own clock, taken one run after the other; with ``times`` (the
    interleaved step times, :mod:`.step_timing`) and SAT's config ``sat``, rows follow with each
    run's schedule re-timed at those times, its FLOP ideal for the same schedule, and the time to
    dense's final loss read off the re-timed curve."""
    cells: dict[str, list[str]] = {}

    def row(name: str, dense_cell: str, cell) -> None:
        cells[name] = [dense_cell, *(cell(r) for _, r in runs)]

    row("steps", str(dense["steps"]), lambda r: str(r["steps"]))
    row("wall time (s)", f"{dense['wall_time_s']:.1f}", lambda r: f"{r['wall_time_s']:.1f}")
    row("train-step time, as run (s)", f"{dense['train_time_s']:.1f}", lambda r: f"{r['train_time_s']:.1f}")
    row("tokens/s, as run", f"{dense['tokens_per_second']:.0f}", lambda r: f"{r['tokens_per_second']:.0f}")
    for name in sorted(dense["held_out_loss"]):
        row(f"held-out loss: {name}", f"{dense['held_out_loss'][name]:.4f}", lambda r, n=name: f"{r['held_out_loss'].get(n, float('nan')):.4f}")
    row("speedup, as run", "1.00x", lambda r: f"{dense['train_time_s'] / r['train_time_s']:.2f}x" if r["train_time_s"] else "-")
    if times is not None:
        def per_step(r: dict) -> float:
            return times.schedule_time(sat, r["steps"]) / r["steps"]

        row("step time, interleaved (s)", f"{times.dense_s:.3f}", lambda r: f"{per_step(r):.3f}")
        row("speedup per step, interleaved", "1.00x", lambda r: f"{times.dense_s / per_step(r):.2f}x")
        row("FLOP ideal, same schedule", "1.00x", lambda r: f"{times.schedule_ideal(sat, r['steps']):.2f}x")
    first = next(iter(dense["held_out_loss"]), None)  # the config's first held-out set: the target domain
    if first is not None:
        target = dense["held_out_loss"][first]

        def reached(r: dict, retimed: bool = False) -> str:
            evals, total = r["history"]["held_out"], dense["train_time_s"]
            if retimed:
                evals = [{**e, "train_time_s": times.curve_time(sat, r["steps"], e["step"])} for e in evals]
                total = times.dense_s * dense["steps"]
            t = time_to_reach(evals, first, target)
            return f"{t / total:.2f}x" if t is not None else "not reached"

        row(f"held-out loss vs dense: {first}", "", lambda r: f"{100 * (r['held_out_loss'].get(first, float('nan')) / target - 1):+.2f}%")
        row(f"train-step time to dense's final {first} loss, as run", "1.00x", reached)
        if times is not None:
            row(f"train-step time to dense's final {first} loss, interleaved", "1.00x", lambda r: reached(r, retimed=True))
    head = "| | dense | " + " | ".join(label for label, _ in runs) + " |"
    lines = [head, "|---|" + "---|" * (len(runs) + 1), *[f"| {name} | " + " | ".join(c) + " |" for name, c in cells.items()]]
    return "\n".join(lines)


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

