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
    """The held-out sets of ``reports`` in the order they were evaluated: the config's, its target domain first."""
    names = dict.fromkeys(k for r in reports for row in r["history"]["held_out"] for k in row)
    return [n for n in names if n not in ("step", "train_time_s")]


def plot_report(report: dict[str, Any], path: Path) -> None:
    _save(report_figure(report), path)


def plot_comparison(runs: list[tuple[str, dict[str, Any]]], path: Path, xlabel: str = TIME_AXIS) -> None:
    _save(comparison_figure(runs, xlabel), path)


def report_figure(report: dict[str, Any]):
    """One run against optimizer step: held-out and training loss, omission rate, tokens/s."""
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(7, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 1, 1.5]})
    _losses(axes[0], axes[1], report, x="step")
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
    """Several runs of one scenario (e.g. dense and SAT) against their history's ``train_time_s``
    (``xlabel`` says which clock that is): one panel per held-out set (a marker at each evaluation;
    sets differ in level by more than runs differ, so one axis would flatten the runs together), the
    training loss, the omission rate; colour and line style are the run. A run labelled ``dense``
    also draws its last point on the first set as a horizontal line: where another run's curve
    crosses it is its time to dense's loss."""
    plt = _pyplot()
    names = held_out_names([r for _, r in runs])
    fig, axes = plt.subplots(
        len(names) + 2,
        1,
        figsize=(7, 4 + 2.5 * len(names)),
        sharex=True,
        gridspec_kw={"height_ratios": [2.5] * len(names) + [2, 1]},
    )
    held, train, rate = axes[: len(names)], axes[-2], axes[-1]
    for i, (label, report) in enumerate(runs):
        style, color = LINESTYLES[i % len(LINESTYLES)], f"C{i}"
        for ax, name in zip(held, names):
            _held_out(ax, report, name, x="train_time_s", style=style, color=color, label=label)
        _train_loss(train, report, x="train_time_s", style=style, color=color, label=f"{label}: ")
        steps = report["history"]["steps"]
        rate.step(
            [s["train_time_s"] for s in steps], [s["omission_rate"] for s in steps], style, where="post", label=label, color=color
        )
        for ax in axes:
            _mark_rungs(ax, steps, x="train_time_s", style=style, label_rates=ax is axes[0])
    dense = next((r for label, r in runs if label == "dense"), None)
    end = [e for e in dense["history"]["held_out"] if e.get(names[0]) is not None] if dense is not None and names else []
    if end:
        held[0].axhline(end[-1][names[0]], color="0.3", linewidth=0.8, label=f"dense's final {names[0]} loss")
    for ax, name in zip(held, names):
        ax.set_ylabel(f"held-out loss:\n{name}")
    rate.legend(fontsize=8)
    rate.set_xlabel(xlabel)
    task = runs[0][1]["config"].get("task", "") if runs else ""
    legend = ", ".join(f"{label} ({LINESTYLES[i % len(LINESTYLES)]})" for i, (label, _) in enumerate(runs))
    _finish(fig, [*held, train, rate], f"sat-train {task}: {legend}")
    return fig


def _losses(held, train, report, *, x: str) -> None:
    """One run's held-out losses (markers at each evaluation) on ``held``, one colour per set; its
    training loss, raw and smoothed, on ``train``."""
    for i, name in enumerate(held_out_names([report])):
        _held_out(held, report, name, x=x, style="-", color=f"C{i}", label=name)
    _train_loss(train, report, x=x, style="-", color="C7", label="")


def _held_out(ax, report, name: str, *, x: str, style: str, color: str, label: str) -> None:
    points = [(e[x], e[name]) for e in report["history"]["held_out"] if e.get(name) is not None]
    if points:
        ax.plot(*zip(*points), style, marker="o", markersize=4, color=color, label=label)


def _train_loss(ax, report, *, x: str, style: str, color: str, label: str) -> None:
    """The training loss, raw (faint) and smoothed over a tenth of its logged points; ``label`` prefixes the legend."""
    losses = [r for r in report["history"]["train_loss"] if r.get("loss") is not None]
    if losses:
        xs, ys = [r[x] for r in losses], [r["loss"] for r in losses]
        ax.plot(xs, ys, style, alpha=0.25, color=color)
        window = max(1, len(ys) // 10)
        ax.plot(xs, smooth(ys, window), style, color=color, label=f"{label}train (mean of {window} logs)")


def _mark_rungs(ax, steps: list[dict[str, Any]], *, x: str, style: str, label_rates: bool) -> None:
    for change in rung_changes(steps):
        ax.axvline(change[x], linestyle=style, color="0.5", linewidth=0.8)
        if label_rates:
            ax.annotate(
                f"r={change['omission_rate']:g}",
                (change[x], 1),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="0.4",
                ha="left",
                va="top",
                rotation=90,
            )


def _finish(fig, axes, title: str) -> None:
    """Labels and legends; ``axes``: the held-out panel(s) (labelled by their maker when several), the
    training loss, the omission rate."""
    if len(axes) == 3:
        axes[0].set_ylabel("held-out loss")
    axes[-2].set_ylabel("training loss")
    axes[-1].set_ylabel("omission rate")
    axes[-1].set_ylim(-0.05, 1.0)
    for ax in axes[:-1]:
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
