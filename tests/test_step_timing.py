"""Interleaved step timing (`sat_trainer.app.step_timing`): the order, the rates timed, the schedule
arithmetic that sizes `--compare-dense`'s equal-time run, and a real measurement on a tiny model."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import transformers

from sat_trainer import SATConfig
from sat_trainer.app import step_timing
from sat_trainer.app.report import comparison_table
from sat_trainer.app.run_config import load_run_config
from sat_trainer.app.step_timing import StepTimes, interleaved, timed_rates
from sat_trainer.schedule import omission_rate_at

LADDER = SATConfig(
    omission_rate=0.5, schedule="ladder", ladder_sparse_fraction=0.75, ladder_num_rungs=2, dense_warmup_fraction=0.0
)


def test_interleaved_rotates_the_order_and_drops_warmup_rounds():
    calls: list[str] = []
    clock = iter(range(100))

    def step(name):
        def run():
            calls.append(name)
            return float(next(clock))

        return run

    times = interleaved({"a": step("a"), "b": step("b"), "c": step("c")}, warmup=1, rounds=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert times == {"a": [5.0, 7.0, 9.0], "b": [3.0, 8.0, 10.0], "c": [4.0, 6.0, 11.0]}  # the warm-up's 0-2 dropped


def test_paired_ratio_cancels_a_slow_drift_that_a_ratio_of_medians_keeps():
    # the machine turned 3x slower during round 3, after dense's step and before SAT's; SAT is 0.9x in every other round
    dense = [10.0, 10.0, 10.0, 30.0, 30.0]
    sat = [9.0, 9.0, 30.0, 27.0, 27.0]
    assert step_timing.paired_ratio(sat, dense) == pytest.approx(0.9)
    assert statistics.median(sat) / statistics.median(dense) == pytest.approx(2.7)  # the ratio of medians: 3x off


def test_timed_rates_are_the_ladders_own_or_an_even_grid():
    assert timed_rates(LADDER, 40) == [0.0, 0.25, 0.5]
    cosine = SATConfig(omission_rate=0.6, schedule="cosine", dense_warmup_fraction=0.0)
    assert timed_rates(cosine, 40) == pytest.approx([0.0, 0.2, 0.4, 0.6])


def test_schedule_time_sums_the_medians_and_sizes_the_equal_time_run():
    times = StepTimes(dense_s=1.0, sat_s={0.0: 1.0, 0.25: 0.8, 0.5: 0.6}, kept_flops={0.0: 1.0, 0.25: 0.75, 0.5: 0.5}, rounds=3)
    rates = [omission_rate_at(LADDER, s, 40) for s in range(40)]
    assert rates.count(0.5) == 30 and rates.count(0.25) == 5 and rates.count(0.0) == 5
    assert times.schedule_time(LADDER, 40) == pytest.approx(30 * 0.6 + 5 * 0.8 + 5 * 1.0)  # 27 s against dense's 40 s
    assert times.schedule_ideal(LADDER, 40) == pytest.approx(40 / (30 * 0.5 + 5 * 0.75 + 5 * 1.0))
    steps = times.equal_time_steps(LADDER, 40)
    assert times.schedule_time(LADDER, steps) == pytest.approx(40.0) and times.schedule_time(LADDER, steps + 1) > 40.1
    assert steps == 59  # ~40 / (27 / 40) = 59.3; a 59-step ladder's rungs round to exactly 40 s
    assert times.curve_time(LADDER, 40, 30) == pytest.approx(18.0) and times.curve_time(LADDER, 40, 0) == 0
    assert times.at(0.375) == pytest.approx(0.7)  # between the timed rates: linear
    assert StepTimes.from_dict(json.loads(json.dumps(times.to_dict()))) == times


def test_equal_time_run_is_never_shorter_than_one_step():
    slow = StepTimes(dense_s=1.0, sat_s={0.0: 5.0, 0.5: 5.0}, kept_flops={0.0: 1.0, 0.5: 0.5}, rounds=1)
    assert slow.equal_time_steps(LADDER, 2) == 1


def _report(steps: int, train_time: float, curve: list[tuple[int, float]]) -> dict:
    evals = [{"step": s, "train_time_s": train_time * s / steps, "new": loss} for s, loss in curve]
    return {
        "steps": steps,
        "wall_time_s": train_time,
        "train_time_s": train_time,
        "tokens_per_second": 1.0,
        "held_out_loss": {"new": curve[-1][1]},
        "history": {"held_out": evals},
    }


def test_comparison_table_retimes_the_curve_at_the_interleaved_times():
    dense = _report(40, 40.0, [(0, 5.0), (20, 4.0), (40, 3.0)])
    # as run, SAT's clock was slow (a busy machine: 48 s); interleaved, its ladder takes 27 s of dense's 40
    sat = _report(40, 48.0, [(0, 5.0), (20, 3.5), (40, 2.9)])
    times = StepTimes(dense_s=1.0, sat_s={0.0: 1.0, 0.25: 0.8, 0.5: 0.6}, kept_flops={0.0: 1.0, 0.25: 0.75, 0.5: 0.5}, rounds=3)
    table = comparison_table(dense, [("SAT", sat)], times, LADDER)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()}
    assert not [
        line for line in table.splitlines() if line.startswith("|") and "as run" in line
    ]  # the machine's load: no headline
    assert rows["speedup per step, interleaved"][-1].strip(" |") == f"{40 / 27:.2f}x"
    assert rows["FLOP ideal, same schedule"][-1].strip(" |") == f"{40 / 23.75:.2f}x"
    # re-timed, step 20 is at 12 s (all at rate 0.5) and step 40 at 27 s; dense's final 3.0 lies 5/6 of the way from
    # 3.5 to 2.9: at 12 + 15 * 5 / 6 = 24.5 s of dense's 40 s
    assert rows["train-step time to dense's final new loss, re-timed"][-1].strip(" |") == "0.61x"
    assert "interleaved" not in comparison_table(dense, [("SAT", sat)])


def test_measure_times_dense_and_each_rate_on_a_real_model():
    from sat_trainer.patch.model import handle_of

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
        )
    )
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], gradient_accumulation_steps=2)
    ids = torch.randint(0, 64, (2, 16))
    before = [p.detach().clone() for p in model.parameters()]
    times = step_timing.measure(model, {"input_ids": ids, "labels": ids}, args, LADDER, [0.0, 0.5], rounds=2)
    assert set(times.sat_s) == {0.0, 0.5} and {k: len(v) for k, v in times.samples.items()} == {
        "dense": 2,
        "sat@0.5": 2,
    }  # dense: rate 0
    assert times.sat_s[0.0] == times.dense_s > 0
    assert times.kept_flops[0.0] == 1.0 and times.kept_flops[0.5] < 1.0
    assert any(not p.equal(b) for p, b in zip(model.parameters(), before))  # it trained: 3 rounds x 2 variants
    assert handle_of(model) is None  # and is unpatched again


def test_measure_times_the_omitted_update_with_the_sat_steps(monkeypatch):
    """A timed SAT step costs what a trained one does: with omitted_update momentum the omitted slices'
    gradients are rewritten before every SAT step's optimizer step (from its second step on, when the
    optimizer has a first moment), never in a dense step (nothing omitted)."""
    from sat_trainer import omitted_update

    calls: list[int] = []
    real = omitted_update.continue_momentum

    def spy(handle, optimizer, decay):
        assert decay == 0.97  # the config's momentum_decay reaches the timed step
        calls.append(sum(len(u.omitted_parameters()) for u in handle.units))
        real(handle, optimizer, decay)

    monkeypatch.setattr(omitted_update, "continue_momentum", spy)
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
        )
    )
    args = transformers.TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    ids = torch.randint(0, 64, (2, 16))
    cfg = SATConfig(omission_rate=0.5, schedule="constant", omitted_update="momentum", momentum_decay=0.97)
    step_timing.measure(model, {"input_ids": ids, "labels": ids}, args, cfg, [0.0, 0.5], rounds=2)
    assert len(calls) == 6  # 3 rounds x (dense + SAT at 0.5)
    assert sorted(calls) == [0, 0, 0, 6, 6, 6]  # SAT: gate and up rows, down columns, per layer; dense: none


def test_a_resumed_comparison_reuses_the_measured_times(tmp_path):
    from sat_trainer.app.run import time_steps

    cfg = load_run_config("cpt", "configs/demo_cpt.yaml", [f"training.output_dir={tmp_path}"])
    saved = StepTimes(dense_s=2.0, sat_s={0.0: 2.0, 0.5: 1.5}, kept_flops={0.0: 1.0, 0.5: 0.6}, rounds=4)
    (tmp_path / "step_times.json").write_text(json.dumps(saved.to_dict()))
    assert time_steps(cfg, 40, reuse=True) == saved  # read back: nothing measured (the demo base is not even built)
