"""`sat-train` end to end on a tiny base built from the shipped corpus: run folder, report,
plain-transformers final model, dense comparison, and failures before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sat_trainer import SATConfig
from sat_trainer.app.cli import main
from sat_trainer.app.step_timing import StepTimes


def _overrides(base, out, steps=4):
    return [
        "--set",
        f"model={base}",
        "--set",
        f"training.output_dir={out}",
        "--set",
        f"training.max_steps={steps}",
        "--set",
        "training.eval_steps=2",
        "--set",
        "training.logging_steps=1",
        "--set",
        "training.per_device_train_batch_size=2",
        "--set",
        "data.max_length=32",
        "--set",
        "data.max_train_samples=40",
        "--set",
        "data.max_eval_samples=4",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["cpt", "sft"])
def test_sat_train_end_to_end(task, tiny_base, tmp_path):
    out = tmp_path / task
    assert main([task, "--config", f"configs/demo_{task}.yaml", *_overrides(tiny_base, out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "sat" and report["steps"] == 4 and report["tokens"] > 0
    assert report["tokens_per_second"] > 0 and report["wall_time_s"] >= report["train_time_s"] > 0
    assert report["omission_schedule"] == [0.5, 0.5, 0.5, 0.0]  # ladder 0.75 sparse, 2 rungs, 4 steps
    expected_sets = {"cpt": {"continual", "base"}, "sft": {"chat"}}[task]
    assert set(report["held_out_loss"]) == expected_sets and all(v > 0 for v in report["held_out_loss"].values())
    evals = report["history"]["held_out"]
    assert [e["step"] for e in evals] == [0, 2, 4] and evals[0]["train_time_s"] == 0  # evaluated before the first step too
    assert (out / "report.png").stat().st_size > 10_000
    script = (
        "import sys, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out / 'final')!r})\n"
        f"t = transformers.AutoTokenizer.from_pretrained({str(out / 'final')!r})\n"
        "print(m(**t('To be', return_tensors='pt')).logits.shape[-1])\n"
        "assert 'sat_trainer' not in sys.modules\n"
    )
    printed = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert int(printed.strip()) == 300


@pytest.mark.slow
def test_compare_dense_prints_a_side_by_side_table(tiny_base, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["cpt", "--config", "configs/demo_cpt.yaml", "--compare-dense", *_overrides(tiny_base, out, steps=3)]) == 0
    table = capsys.readouterr().out
    assert (
        "| | dense | SAT, equal steps | SAT, equal time (" in table and "speedup" in table and "held-out loss: continual" in table
    )
    dense = json.loads((out / "dense" / "report.json").read_text())
    sat = json.loads((out / "sat" / "report.json").read_text())
    timed = json.loads((out / "sat_equal_time" / "report.json").read_text())
    assert dense["omission_schedule"] == [0.0, 0.0, 0.0]
    assert sat["omission_schedule"] == [0.5, 0.5, 0.0]
    # CPT: the third run has the steps that fit in dense's train-step time at the interleaved step times
    times = StepTimes.from_dict(json.loads((out / "step_times.json").read_text()))
    assert set(times.sat_s) == {0.0, 0.5} and times.kept_flops[0.0] == 1.0 and times.kept_flops[0.5] < 1.0
    assert times.rounds == 5 and {k: len(v) for k, v in times.samples.items()} == {"dense": 5, "sat@0.5": 5}
    assert timed["steps"] == times.equal_time_steps(SATConfig.from_yaml("configs/demo_cpt.yaml"), 3)
    assert timed["omission_schedule"][-1] == 0.0 and f"equal time ({timed['steps']} steps)" in table
    assert "| step time, interleaved (s) |" in table and "| FLOP ideal, same schedule | 1.00x |" in table
    assert "time to dense's final continual loss, re-timed" in table
    assert not [
        line for line in table.splitlines() if line.startswith("|") and "as run" in line
    ]  # the machine's load: not a headline
    assert json.loads((out / "compare.json").read_text())["timing"] == "interleaved"
    assert (out / "compare.md").read_text().startswith("| | dense | SAT, equal steps |")
    assert "held-out loss vs dense: continual" in table and "time to dense's final continual loss" in table
    starts = [json.loads((out / mode / "report.json").read_text())["history"]["held_out"][0] for mode in ("sat", "dense")]
    assert starts[0]["step"] == starts[1]["step"] == 0 and starts[0]["continual"] == pytest.approx(
        starts[1]["continual"]
    )  # same model at step 0
    assert (out / "report.png").stat().st_size > 10_000  # dense and SAT curves together


@pytest.mark.slow
def test_compare_dense_without_timing_sizes_equal_time_from_the_runs(tiny_base, tmp_path, capsys):
    out = tmp_path / "cmp0"
    args = [
        "cpt",
        "--config",
        "configs/demo_cpt.yaml",
        "--compare-dense",
        "--timing-rounds",
        "0",
        *_overrides(tiny_base, out, steps=3),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    dense, sat, timed = (json.loads((out / m / "report.json").read_text()) for m in ("dense", "sat", "sat_equal_time"))
    assert timed["steps"] == max(1, int(dense["train_time_s"] * 3 / sat["train_time_s"]))  # SAT's own time per step
    assert not (out / "step_times.json").exists() and "interleaved" not in table and "speedup per step, as run" in table


def test_negative_timing_rounds_is_refused(tmp_path, capsys):
    assert (
        main(
            [
                "cpt",
                "--config",
                "configs/demo_cpt.yaml",
                "--compare-dense",
                "--timing-rounds",
                "-1",
                "--set",
                f"training.output_dir={tmp_path}",
            ]
        )
        == 2
    )
    assert "--timing-rounds has invalid value -1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.no_such_arg=1", "unknown key 'training.no_such_arg'"),
        ("sat.omission_rate=2", "'omission_rate' has invalid value 2"),
        ("data.train=./no/such/file.jsonl", "data path not found: ./no/such/file.jsonl"),
    ],
)
def test_bad_config_fails_before_training(tmp_path, capsys, override, message):
    code = main(["cpt", "--config", "configs/demo_cpt.yaml", "--set", f"training.output_dir={tmp_path}", "--set", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
