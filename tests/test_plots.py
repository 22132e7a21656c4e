"""report.png content: held-out points from step 0, the training loss raw and smoothed beside
them, a marked rung change in every panel, and a comparison of any number of runs."""

from __future__ import annotations

import pytest

from sat_trainer.app.plots import comparison_figure, plot_comparison, report_figure, rung_changes, smooth


def _report(mode: str, rates: list[float], offset: float = 0.0) -> dict:
    steps = [
        {"step": i + 1, "train_time_s": 0.5 * (i + 1), "tokens": 100 * (i + 1), "omission_rate": r} for i, r in enumerate(rates)
    ]
    losses = [{"step": s["step"], "train_time_s": s["train_time_s"], "loss": 5.0 - 0.1 * s["step"] + offset} for s in steps]
    evals = [{"step": s, "train_time_s": 0.5 * s, "new": 5.0 - 0.1 * s + offset, "old": 4.0 + offset} for s in (0, 4, 8)]
    return {"mode": mode, "config": {"task": "cpt"}, "history": {"steps": steps, "train_loss": losses, "held_out": evals}}


LADDER = [0.5] * 6 + [0.25, 0.0]  # rungs change at steps 7 and 8


def test_rung_changes_and_smoothing():
    assert [c["step"] for c in rung_changes(_report("sat", LADDER)["history"]["steps"])] == [7, 8]
    assert rung_changes(_report("dense", [0.0] * 8)["history"]["steps"]) == []
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_single_run_plot_has_step_zero_train_loss_and_rung_marks():
    fig = report_figure(_report("sat", LADDER))
    held, train, rate, _ = fig.axes
    assert sorted(line.get_xdata()[0] for line in held.get_lines() if line.get_marker() == "o") == [0, 0]  # both sets from step 0
    curves = [line for line in train.get_lines() if line.get_linestyle() != "--" and len(line.get_xdata()) == 8]
    assert len(curves) == 2  # the raw training loss and its smoothed mean
    for ax in fig.axes:  # one vertical line per rung change, in every panel
        assert sorted(line.get_xdata()[0] for line in ax.get_lines() if list(line.get_xdata()) == [line.get_xdata()[0]] * 2) == [
            7,
            8,
        ]


def test_comparison_takes_any_number_of_runs(tmp_path):
    runs = [
        ("SAT", _report("sat", LADDER)),
        ("dense", _report("dense", [0.0] * 8, 0.1)),
        ("SAT equal time", _report("sat", LADDER, -0.1)),
    ]
    fig = comparison_figure(runs)
    new, old, train, rate = fig.axes  # one panel per held-out set: their levels differ by more than the runs do
    for ax, name in ((new, "new"), (old, "old")):
        assert {line.get_label() for line in ax.get_lines() if line.get_marker() == "o"} == {label for label, _ in runs}
        assert name in ax.get_ylabel()
    assert len({line.get_linestyle() for line in rate.get_lines() if line.get_label() in ("SAT", "dense", "SAT equal time")}) == 3
    marks = [
        line.get_xdata()[0]
        for line in new.get_lines()
        if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]
    ]
    assert sorted(marks) == pytest.approx([3.5, 3.5, 4.0, 4.0])  # both SAT runs' rung changes, in training time
    target = [line for line in new.get_lines() if line.get_label() == "dense's final new loss"]
    assert len(target) == 1 and list(target[0].get_ydata()) == [5.0 - 0.8 + 0.1] * 2  # dense's last point: where to cross
    plot_comparison(runs, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000
