"""The `--compare-dense` report: its headline is on the interleaved clock (the runs' own clocks carry
the machine's load), `report.png` draws every curve re-timed, the shipped configs give curves enough
points, and a cheaper held-out subset for the curves leaves the headline losses on the whole sets."""

from __future__ import annotations

import json

import pytest

from sat_trainer import SATConfig
from sat_trainer.app import report as report_module
from sat_trainer.app.plots import comparison_figure
from sat_trainer.app.report import (
    AS_RUN,
    ReportCallback,
    build_report,
    comparison,
    comparison_table,
    write_comparison,
)
from sat_trainer.app.run import curve_subsets
from sat_trainer.app.run_config import load_run_config
from sat_trainer.app.step_timing import StepTimes
from sat_trainer.app.training_args import training_arguments

LADDER = SATConfig(
    omission_rate=0.5, schedule="ladder", ladder_sparse_fraction=0.75, ladder_num_rungs=2, dense_warmup_fraction=0.0
)
TIMES = StepTimes(dense_s=1.0, sat_s={0.0: 1.0, 0.25: 0.8, 0.5: 0.6}, kept_flops={0.0: 1.0, 0.25: 0.75, 0.5: 0.5}, rounds=3)


def _report(mode: str, steps: int, seconds_per_step: float, curve: list[tuple[int, float]], final: float | None = None) -> dict:
    """A run whose own clock ran at ``seconds_per_step`` (as run: the machine's load included)."""
    rates = [0.5 if mode == "sat" and s < 0.75 * steps else 0.0 for s in range(steps)]
    history = {
        "steps": [
            {"step": s + 1, "train_time_s": seconds_per_step * (s + 1), "tokens": 10 * (s + 1), "omission_rate": r}
            for s, r in enumerate(rates)
        ],
        "train_loss": [{"step": s, "train_time_s": seconds_per_step * s, "loss": loss + 0.5} for s, loss in curve if s],
        "held_out": [{"step": s, "train_time_s": seconds_per_step * s, "new": loss, "old": 4.0} for s, loss in curve],
    }
    held_out = {"new": curve[-1][1] if final is None else final, "old": 4.0}
    return {
        "mode": mode,
        "steps": steps,
        "wall_time_s": seconds_per_step * steps + 30,
        "train_time_s": seconds_per_step * steps,
        "tokens_per_second": 10 / seconds_per_step,
        "held_out_loss": held_out,
        "history": history,
        "config": {"task": "cpt"},
    }


CURVE = [(s, 5.0 - 0.05 * s) for s in range(0, 41, 5)]


def _runs() -> tuple[dict, list[tuple[str, dict]]]:
    dense = _report("dense", 40, 1.0, CURVE)
    # as run, SAT's clock was slow (a busy machine: 1.5 s a step), so an as-run speedup would say 0.67x
    sat = _report("sat", 40, 1.5, [(s, loss - 0.02) for s, loss in CURVE])
    return dense, [("SAT, equal steps", sat)]


def test_headline_rows_are_interleaved_and_the_as_run_times_are_labelled_as_load():
    dense, runs = _runs()
    table = comparison_table(dense, runs, TIMES, LADDER)
    headline = [line for line in table.splitlines() if line.startswith("|")]
    assert not [line for line in headline if "as run" in line or "tokens/s" in line]
    rows = {line.split(" | ")[0].strip("| "): [c.strip(" |") for c in line.split(" | ")[1:]] for line in headline}
    assert rows["speedup per step, interleaved"] == ["1.00x", f"{40 / 27:.2f}x"]  # 30 steps at 0.6 s, 10 at 1 s
    assert rows["train-step time, re-timed (s)"] == ["40.0", "27.0"]
    assert rows["held-out loss vs dense: new"][1] == f"{100 * (3.0 - 0.02 - 3.0) / 3.0:+.2f}%"
    # re-timed, SAT's step 35 (3.23) is at 30 * 0.6 + 5 = 23 s, step 40 (2.98) at 27 s: dense's 3.0 at 26.2 s of dense's 40
    assert rows["train-step time to dense's final new loss, re-timed"] == ["1.00x", f"{(23 + 4 * 0.23 / 0.25) / 40:.2f}x"]
    load = [line for line in table.splitlines() if line.startswith(f"wall time {AS_RUN}")]
    assert load == [
        (
            f"wall time {AS_RUN} (s): dense 70.0, SAT, equal steps 90.0 (the runs ran one after the other; speed is "
            "compared on the interleaved times above)"
        )
    ]


def test_a_speedup_above_the_flop_ideal_is_flagged_as_noise_not_shown_as_a_result():
    dense, runs = _runs()
    assert "FLOP ideal" not in "".join(
        line for line in comparison_table(dense, runs, TIMES, LADDER).splitlines() if line.startswith("note")
    )
    noisy = StepTimes(dense_s=1.0, sat_s={0.0: 1.0, 0.25: 0.5, 0.5: 0.3}, kept_flops=TIMES.kept_flops, rounds=3)
    numbers = comparison(dense, runs, noisy, LADDER)["runs"][1]
    assert numbers["speedup_per_step"] > 1.05 * numbers["flop_ideal"]  # 30 steps at 0.3 s: faster than half the FLOPs allow
    notes = [line for line in comparison_table(dense, runs, noisy, LADDER).splitlines() if line.startswith("note")]
    assert len(notes) == 1 and "SAT, equal steps" in notes[0] and "above its FLOP ideal" in notes[0]


def test_without_interleaved_times_the_speed_rows_say_they_are_as_run():
    dense, runs = _runs()
    numbers = comparison(dense, runs)
    assert numbers["timing"] == "as run" and numbers["runs"][1]["speedup_per_step"] == pytest.approx(1 / 1.5)
    table = comparison_table(dense, runs)
    assert f"| speedup per step, {AS_RUN} | 1.00x | 0.67x |" in table and "interleaved" not in table


def test_report_png_plots_every_run_against_the_retimed_clock(tmp_path, monkeypatch):
    dense, runs = _runs()
    drawn = {}
    monkeypatch.setattr(report_module, "plot_comparison", lambda curves, path, xlabel: drawn.update(curves=curves, xlabel=xlabel))
    write_comparison(tmp_path, dense, runs, TIMES, LADDER)
    assert [label for label, _ in drawn["curves"]] == ["dense", "SAT, equal steps"] and "re-timed" in drawn["xlabel"]
    held = comparison_figure(drawn["curves"], drawn["xlabel"]).axes[0]  # the first held-out set's panel
    lines = {line.get_label(): list(line.get_xdata()) for line in held.get_lines() if line.get_marker() == "o"}
    assert lines["dense"] == pytest.approx([float(s) for s, _ in CURVE])  # dense: 1 s a step, not as run
    assert lines["SAT, equal steps"] == pytest.approx([TIMES.curve_time(LADDER, 40, s) for s, _ in CURVE])
    assert lines["SAT, equal steps"][-1] == pytest.approx(27.0)  # not the 60 s SAT's own clock said
    assert held.figure.axes[-1].get_xlabel() == drawn["xlabel"]
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["timing"] == "interleaved" and [r["label"] for r in saved["runs"]] == ["dense", "SAT, equal steps"]
    assert saved["runs"][1]["flop_ideal"] == pytest.approx(40 / 23.75) and saved["runs"][1]["wall_time_as_run_s"] == 90.0
    assert (tmp_path / "compare.md").read_text().startswith("| | dense | SAT, equal steps |")


@pytest.mark.parametrize("config", ["smollm2_cpt", "smollm2_sft", "demo_cpt", "demo_sft"])
def test_shipped_configs_evaluate_at_least_eight_points_per_run(config):
    cfg = load_run_config(config.split("_")[-1], f"configs/{config}.yaml")
    args = training_arguments(cfg.training, has_eval=bool(cfg.data.eval), output_dir="unused")
    steps = cfg.training["max_steps"]
    points = {s for s in range(args.eval_steps, steps + 1, args.eval_steps)} | {
        0,
        steps,
    }  # eval_on_start, and run() ends the curve
    assert args.eval_on_start and len(points) >= 8


def test_the_main_jobs_curves_use_a_subset_and_its_headline_the_whole_sets():
    cfg = load_run_config("cpt", "configs/smollm2_cpt.yaml")
    assert cfg.data.curve_eval_samples < cfg.data.max_eval_samples


def test_curve_subsets_are_evenly_spaced_and_the_whole_sets_give_the_report_losses():
    import datasets

    sets = {"new": datasets.Dataset.from_dict({"i": list(range(16))}), "old": datasets.Dataset.from_dict({"i": list(range(3))})}
    subsets = curve_subsets(sets, 4)
    assert subsets["new"]["i"] == [0, 4, 8, 12] and subsets["old"] is sets["old"]  # a set no larger is kept whole
    assert curve_subsets(sets, None) is sets
    record = ReportCallback()

    class State:
        global_step = 40

    record.on_log(None, State(), None, logs={"eval_new_loss": 3.1, "eval_new_runtime": 1.0})
    record.on_log(None, State(), None, logs={"whole_new_loss": 3.0, "whole_old_loss": 4.0})
    report = build_report(record, mode="dense", config={"data": {"curve_eval_samples": 4}}, wall_time_s=1.0)
    assert report["held_out_loss"] == {"new": 3.0, "old": 4.0} and report["curve_eval_samples"] == 4
    assert report["history"]["held_out"] == [{"step": 40, "train_time_s": 0.0, "new": 3.1}]
