"""``report.png`` of one run and of a comparison: curves a user can read a trend from.

Both show the held-out losses (from step 0: ``sat-train`` evaluates before the first step), the
training loss beside them (raw, faint, and smoothed over a trailing window of logged points),
the omission rate, and a dotted line where the ladder changes rung, in every panel, so a bend
in a loss curve can be read against the rate change that caused it. A comparison takes any
number of runs (``[(label, report), ...]``) and puts them on one time axis, each history row's
``train_time_s``: ``sat-train --compare-dense`` passes the runs re-timed at the interleaved step
times (:func:`.report.comparison_curves`), so the axis is what SAT is meant to save and not the
machine's load while each run ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LINESTYLES = ("-", "--", ":", "-.")
TIME_AXIS = "time inside training steps (s)"


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (fewer at the start): noise out, no lag beyond the window."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i + 1 - window) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def rung_changes(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The step records where the omission rate differs from the step before (the first rung excluded)."""
    return [b for a, b in zip(steps, steps[1:]) if b["omission_rate"] != a["omission_rate"]]


def held_out_names(reports: list[dict[str, Any]]) -> list[str]:
    return sorted({k for r in reports for row in r["history"]["held_out"] for k in row} - {"step", "train_time_s"})


def plot_report(report: dict[str, Any], path: Path) -> None:
    _save(report_figure(report), path)


def plot_comparison(runs: list[tuple[str, dict[str, Any]]], path: Path, xlabel: str = TIME_AXIS) -> None:
    _save(comparison_figure(runs, xlabel), path)


def report_figure(report: dict[str, Any]):
    """One run against optimizer step: held-out and training loss, omission rate, tokens/s."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1, 1.5]})
    _losses(axes[0], axes[1], report, x="step", style="-", label="", color_by_set=True)
    steps = report["history"]["steps"]
    axes[2].step([s["step"] for s in steps], [s["omission_rate"] for s in steps], where="post")
    rates = _windowed_tokens_per_second(steps)
    axes[3].plot([s for s, _ in rates], [r for _, r in rates])
    axes[3].set_ylabel("tokens / s\n(train steps)")
    axes[3].set_xlabel("optimizer step")
    for ax in axes:
        _mark_rungs(ax, steps, x="step", style=":", label_rates=ax is axes[0])
    _finish(fig, axes[:3], f"sat-train {report['config'].get('task', '')} ({report['mode']})")
    return fig


def comparison_figure(runs: list[tuple[str, dict[str, Any]]], xlabel: str = TIME_AXIS):
    """Several runs of one scenario (e.g. SAT and dense) against their history's ``train_time_s``
    (``xlabel`` says which clock that is): held-out (a marker at each evaluation) and training loss,
    omission rate; colour is the held-out set, line style the run."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(7, 9), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1]})
    names = held_out_names([r for _, r in runs])
    for i, (label, report) in enumerate(runs):
        style = LINESTYLES[i % len(LINESTYLES)]
        _losses(axes[0], axes[1], report, x="train_time_s", style=style, label=label, names=names, train_color=f"C{len(names) + i}")
        steps = report["history"]["steps"]
        axes[2].step([s["train_time_s"] for s in steps], [s["omission_rate"] for s in steps], style, where="post", label=label, color="k")
        for ax in axes:
            _mark_rungs(ax, steps, x="train_time_s", style=style, label_rates=ax is axes[0])
    axes[2].legend(fontsize=8)
    axes[2].set_xlabel(xlabel)
    task = runs[0][1]["config"].get("task", "") if runs else ""
    legend = ", ".join(f"{label} ({LINESTYLES[i % len(LINESTYLES)]})" for i, (label, _) in enumerate(runs))
    _finish(fig, axes, f"sat-train {task}: {legend}")
    return fig


def _losses(held, train, report, *, x: str, style: str, label: str, names: list[str] | None = None,
            color_by_set: bool = False, train_color: str = "C7") -> None:
    """Held-out losses (markers at each evaluation) on ``held``; the training loss, raw and smoothed, on ``train``."""
    prefix = f"{label}: " if label else ""
    for i, name in enumerate(names or held_out_names([report])):
        points = [(e[x], e[name]) for e in report["history"]["held_out"] if e.get(name) is not None]
        if points:
            held.plot(*zip(*points), style, marker="o", markersize=4, color=f"C{i}", label=prefix + name)
    losses = [r for r in report["history"]["train_loss"] if r.get("loss") is not None]
    if losses:
        xs, ys = [r[x] for r in losses], [r["loss"] for r in losses]
        train.plot(xs, ys, style, alpha=0.25, color=train_color)
        window = max(1, len(ys) // 10)
        train.plot(xs, smooth(ys, window), style, color=train_color, label=f"{prefix}train (mean of {window} logs)")


def _mark_rungs(ax, steps: list[dict[str, Any]], *, x: str, style: str, label_rates: bool) -> None:
    for change in rung_changes(steps):
        ax.axvline(change[x], linestyle=style, color="0.5", linewidth=0.8)
        if label_rates:
            ax.annotate(f"r={change['omission_rate']:g}", (change[x], 1), xycoords=("data", "axes fraction"),
                        fontsize=7, color="0.4", ha="left", va="top", rotation=90)


def _finish(fig, axes, title: str) -> None:
    axes[0].set_ylabel("held-out loss")
    axes[1].set_ylabel("training loss")
    axes[2].set_ylabel("omission rate")
    axes[2].set_ylim(-0.05, 1.0)
    for ax in axes[:2]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\ngrey vertical lines: the omission rate changes rung", fontsize=10)
    fig.tight_layout()


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _windowed_tokens_per_second(steps: list[dict], window: int = 5) -> list[tuple[int, float]]:
    out = []
    for i in range(window, len(steps)):
        dt = steps[i]["train_time_s"] - steps[i - window]["train_time_s"]
        if dt > 0:
            out.append((steps[i]["step"], (steps[i]["tokens"] - steps[i - window]["tokens"]) / dt))
    return out
