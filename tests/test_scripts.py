"""The benchmark scripts' bookkeeping: which eval set and which time the quality table compares."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a script's dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _row(variant: str, seed: int, final: dict, evals: list[dict], time: float) -> dict:
    return {
        "config": "c.yaml",
        "variant": variant,
        "seed": seed,
        "train_time_s": time,
        "held_out_loss": final,
        "evals": evals,
        "sat": None,
        "steps": 10,
    }


def test_quality_table_compares_the_first_configured_eval_set_and_time_to_dense_loss(tmp_path):
    quality = _load("quality")
    dense = _row(
        "dense",
        0,
        {"new": 4.0, "base": 5.0},
        [{"step": 5, "train_time_s": 50, "new": 4.5, "base": 5.0}, {"step": 10, "train_time_s": 100, "new": 4.0, "base": 5.0}],
        100,
    )
    sat = _row(
        "default",
        0,
        {"new": 3.9, "base": 6.0},
        [{"step": 5, "train_time_s": 30, "new": 4.2, "base": 6.0}, {"step": 10, "train_time_s": 60, "new": 3.9, "base": 6.0}],
        60,
    )
    stale = _row("default", 0, {"new": 9.0, "base": 9.0}, [], 1)
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (stale, sat, dense)))

    results = quality.saved_results([str(path)], "c.yaml")
    assert list(results) == ["dense", "default"] and results["default"][0]["held_out_loss"]["new"] == 3.9  # latest row wins
    longer = tmp_path / "long.jsonl"  # a second file, another protocol: --min-steps picks it out
    longer.write_text(json.dumps({**dense, "variant": "dense,training.learning_rate=1e-4", "steps": 200}) + "\n")
    assert list(quality.saved_results([str(path), str(longer)], "c.yaml")) == [
        "dense",
        "default",
        "dense,training.learning_rate=1e-4",
    ]
    assert list(quality.saved_results([str(path), str(longer)], "c.yaml", min_steps=200)) == ["dense,training.learning_rate=1e-4"]
    line = quality.table(results).splitlines()[-1]
    # "new" (listed first in the config) is compared, not the alphabetically first "base"
    assert "-2.50% (new)" in line and "1.67x" in line and "| 0.50x |" in line
    assert quality.time_to_reach(sat["evals"], "new", 4.1) == pytest.approx(40)  # interpolated between (30, 4.2) and (60, 3.9)
    assert quality.time_to_reach(sat["evals"], "new", 4.2) == 30
    assert quality.time_to_reach(sat["evals"], "new", 3.0) is None


def test_quality_variant_names_become_overrides():
    quality = _load("quality")
    assert quality.variant_overrides("dense") == (True, [])
    assert quality.variant_overrides("metric=maxip,selection=topk") == (False, ["sat.metric=maxip", "sat.selection=topk"])
    assert quality.variant_overrides("training.max_steps=160") == (False, ["training.max_steps=160"])
    assert quality.variant_overrides("default") == (False, [])
    assert quality.variant_overrides("dense,training.learning_rate=6e-5") == (True, ["training.learning_rate=6e-5"])
    with pytest.raises(SystemExit, match="only dotted overrides"):
        quality.variant_overrides("dense,omission_rate=0.5")  # a sat setting on a dense run means nothing
    assert quality.variant_overrides("targets=[mlp,attention],metric=uniform") == (
        False,
        ["sat.targets=[mlp,attention]", "sat.metric=uniform"],
    )


def test_sparse_loss_gradient_error_of_backward_only_omission():
    """omit_in backward is judged by gradient error: none at rate 0 (the same gradient), some at 0.5."""
    import sys

    import torch
    from tiny import batch, build

    from sat_trainer import SATConfig

    sys.path.insert(0, str(SCRIPTS))
    sparse_loss = _load("sparse_loss")
    model = build("llama", num_hidden_layers=2).train()
    batches = [{"input_ids": batch(seed), "labels": batch(seed)} for seed in (1, 2)]
    dense = [sparse_loss.gradient(model, b) for b in batches]
    cfg = SATConfig(omit_in="backward", metric="activation")
    cosine, error = sparse_loss.gradient_error(model, batches, dense, cfg, 0.0)
    assert abs(cosine - 1.0) < 1e-4 and error == 0.0
    cosine, error = sparse_loss.gradient_error(model, batches, dense, cfg, 0.5)
    assert 0.5 < cosine < 0.9999 and 0.0 < error < 1.0
    assert torch.count_nonzero(dense[0]) > 0


def test_equal_time_gives_sat_the_steps_that_fit_in_dense_time():
    quality = _load("quality")
    dense = _row("dense", 0, {"new": 4.0}, [], 100.0)
    sat = _row("omit_in=backward", 0, {"new": 4.1}, [], 80.0)  # 10 steps in 80 s: 8 s a step
    assert quality.equal_time_steps(dense, sat) == 12  # 100 s / 8 s
    assert quality.equal_time_steps(dense, dense) == 10


def test_retime_rebuilds_curves_from_quiet_step_times(tmp_path):
    quality = _load("quality")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"rate": 0.5, "omit_in": "backward", "dense_s": 2.0, "sat_s": 1.5}) + "\n")
    times = quality.step_times(str(bench))
    assert list(times) == ["backward"] and times["backward"].dense_s == 2.0 and times["backward"].sat_s == {0.0: 2.0, 0.5: 1.5}
    sat = {"omission_rate": 0.5, "omit_in": "backward", "schedule": "constant", "dense_warmup_fraction": 0.0}
    row = _row(
        "omit_in=backward",
        0,
        {"new": 4.0},
        [{"step": 0, "train_time_s": 9.0, "new": 5.0}, {"step": 4, "train_time_s": 99.0, "new": 4.0}],
        99.0,
    )
    row = quality.retime(row | {"sat": sat, "steps": 4}, times)
    # constant 0.5 until the last step, which every schedule ends at its final value (dense for the ladder; here 0.5)
    assert row["evals"][0]["train_time_s"] == 0.0 and row["train_time_s"] == pytest.approx(4 * 1.5)
    ladder = quality.retime(row | {"sat": {**sat, "schedule": "ladder", "ladder_num_rungs": 2}}, times)
    assert ladder["train_time_s"] == pytest.approx(1.5 * 3 + 2.0)  # 3 steps at 0.5, the last one dense
    with pytest.raises(SystemExit, match="no step time measured around omission rate 0.75"):
        quality.retime(row | {"sat": {**sat, "omission_rate": 0.75}}, times)  # beyond the measured rates: no made-up time


def test_equal_time_from_step_times_uses_the_medians_not_the_runs_clock(tmp_path):
    import argparse

    quality = _load("quality")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"rate": 0.5, "omit_in": "backward", "dense_s": 2.0, "sat_s": 1.0}) + "\n")
    dense = _row("dense", 0, {"new": 4.0}, [], 100.0)
    sat = _row("omit_in=backward", 0, {"new": 4.1}, [], 500.0) | {
        "sat": {"omission_rate": 0.5, "omit_in": "backward", "schedule": "constant", "dense_warmup_fraction": 0.0}
    }
    # dense's 10 steps are 20 s at the medians; SAT at a constant 0.5 takes 1 s a step: 20 of them fit
    assert quality.equal_time_steps_of(argparse.Namespace(step_times=str(bench)), dense, sat) == 20
    assert quality.equal_time_steps_of(argparse.Namespace(step_times=None), dense, sat) == 2  # 100 s at the run's 50 s a step


def test_quality_rows_with_their_own_step_times_are_timed_in_dense_steps():
    """An EST row carrying --timing-rounds' step times: each step costs its stage's measured time over dense's, so
    the curve's times are in dense steps; dense's are its step counts; the equal-time run is sized from them."""
    import argparse

    from sat_trainer.app.step_timing import StepTimes

    quality = _load("quality")
    est = {
        "targets": ["mlp", "layers"],
        "schedule": "est",
        "omit_in": "forward_backward",
        "metric": "uniform",
        "rescale": "inverse_keep",
        "dense_warmup_fraction": 0.0,
        "est_stages": [{"fraction": 0.5, "layers": 0.5, "channels": 0.5}, {"fraction": 0.5}],
    }
    times = StepTimes(dense_s=2.0, sat_s={0.0: 2.0, "layers=0.5,mlp=0.5": 0.5})
    evals = [{"step": 0, "train_time_s": 0.0, "new": 5.0}, {"step": 2, "train_time_s": 7.0, "new": 4.5}]
    evals.append({"step": 4, "train_time_s": 30.0, "new": 4.0})
    row = _row("est", 0, {"new": 4.0}, evals, 30.0) | {"sat": est, "steps": 4, "step_times": times.to_dict()}
    timed = quality.in_dense_steps(row)
    assert [e["train_time_s"] for e in timed["evals"]] == [0.0, 0.5, 2.5]  # 2 steps at 0.25 dense steps, 2 dense
    assert timed["train_time_s"] == 2.5
    dense = _row("dense", 0, {"new": 3.9}, evals, 99.0) | {"steps": 4}
    assert [e["train_time_s"] for e in quality.in_dense_steps(dense)["evals"]] == [0, 2, 4]
    # dense's 4 steps are 8 s; the schedule over 6 steps: 3 at 0.5 s and 3 at 2 s = 7.5 s fits, over 7 steps 8.5 s not
    assert quality.equal_time_steps_of(argparse.Namespace(step_times=None), dense, row) == 6


def test_quality_names_a_run_folder_for_any_variant_and_runs_pretrain_configs_as_pretrain():
    quality = _load("quality")
    assert quality.folder_name("omit_in=backward@equal-time") == "omit_in-backward_equal-time"
    label = "est_stages=[{fraction: 0.4, channels: 0.5},{fraction: 0.6}]"
    name = quality.folder_name(label)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and len(name) <= 80
    assert name != quality.folder_name(label.replace("0.6", "0.5"))  # cut names stay apart by their hash
    assert quality.task_of("configs/pretrain_llama_python.yaml") == "pretrain"
    assert quality.task_of("configs/smollm2_sft_lora.yaml") == "sft"
    assert quality.task_of("configs/smollm2_cpt.yaml") == "cpt"


def test_quality_table_pairs_each_variant_with_dense_of_its_own_seed():
    quality = _load("quality")

    def evals(time: float, new: float) -> list[dict]:
        return [{"step": 10, "train_time_s": time, "new": new}]

    results = {
        "dense": [_row("dense", 0, {"new": 4.0}, evals(100, 4.0), 100), _row("dense", 1, {"new": 2.0}, evals(50, 2.0), 50)],
        # seed 1 first: pairing by list order would set it against seed 0's dense
        "default": [
            _row("default", 1, {"new": 2.2}, evals(50, 2.2), 50),
            _row("default", 0, {"new": 4.4}, evals(100, 4.4), 100),
            _row("default", 2, {"new": 9.0}, evals(10, 9.0), 10),
        ],  # no dense run for seed 2: left out of the comparison
    }
    line = quality.table(results).splitlines()[-1]
    assert "+10.00% (new)" in line and "| 1.00x | not reached |" in line


def test_benchmark_gradient_checkpointing_reaches_every_model_it_times():
    """--gradient-checkpointing: dense, SAT (a copy of dense) and the pruned model all recompute their layers."""
    benchmark = _load("benchmark")
    args = benchmark.parser().parse_args(["--shape", "tiny", "--gradient-checkpointing"])
    assert benchmark.build(args).is_activation_checkpointing
    assert benchmark.build_pruned(args, "both", 0.5).is_activation_checkpointing
    assert not benchmark.build(benchmark.parser().parse_args(["--shape", "tiny"])).is_activation_checkpointing


@pytest.mark.slow
def test_profile_step_shows_what_only_sat_runs_and_refuses_what_has_no_bound():
    """The op table has the three models' columns, and the backward-kept op (SAT only) costs SAT time
    and the pruned model none; flags that time no pruned model are refused."""
    profile_step = _load("profile_step")
    args = profile_step.parse(
        ["--shape", "tiny", "--targets", "mlp", "--omit-in", "backward", "--warmup", "1", "--profile-steps", "1"]
    )
    times = profile_step.op_times(args, "mlp", 0.5)
    assert times["sat"]["_BackwardKeptLinear"][0] > 0 and "_BackwardKeptLinear" not in times["pruned"]
    mm = [times[name]["aten::mm"][2] for name in profile_step.MODELS]  # calls per step: the same matmuls, at other sizes
    assert mm[0] == mm[1] == mm[2] > 0
    text = profile_step.table(times, top=5)
    assert text.splitlines()[2].startswith("| **all ops** |") and len(text.splitlines()) == 8
    for bad in (
        ["--table", "cpu"],
        ["--no-bound"],
        ["--dense-layers", "0"],
        ["--omit-in", "weight_gradient"],
        ["--profile-steps", "0"],
        ["--targets", "mlp", "--sat", "sparse_tokens=context", "--context-fraction", "0.5", "--kernels", "liger"],
    ):
        with pytest.raises(SystemExit):
            profile_step.parse(bad)


SPLIT = ["--shape", "tiny", "--targets", "mlp", "--sat", "sparse_tokens=context", "--context-fraction", "0.5", "--seq", "32"]


def _split_args(benchmark, *more: str):
    return benchmark.parser().parse_args([*SPLIT, *more])


def test_benchmark_split_bound_runs_sats_flop_accounting_exactly():
    """The token split's bound (sparse_tokens context): the dense rows through every MLP channel, the sparse
    rows (SAT's own split of the labels) through the kept ones; its step's matmul FLOPs fall short of the
    dense step's by exactly what SAT's ``kept_flops_fraction`` saves."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from sat_trainer.patch.model import _attention_core_flops

    benchmark = _load("benchmark")
    args = _split_args(benchmark)
    handle, steps = benchmark.training_steps(args, "mlp", 0.5)
    assert set(steps) == {"dense", "sat", "pruned"}
    steps["sat"]()  # the handle reads the split of this forward's labels
    dense_rows, sparse_rows = benchmark.split_rows(args)
    assert torch.equal(dense_rows, handle.token_split[0]) and torch.equal(sparse_rows, handle.token_split[1])
    assert len(sparse_rows) == 2 * 15  # 16 context labels a sequence; the 16th token predicts a label: dense

    def addmm_flop(bias, a, b, out_shape=None, **kwargs):  # shapes; addmm_ (the kept weight gradient) is not in its table
        return 2 * a[0] * a[1] * b[1]

    flops = {}
    for name in ("dense", "pruned"):
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as counter:
            steps[name]()
        flops[name] = counter.get_total_flops()
    shape, k = benchmark.SHAPES["tiny"], benchmark.kept_count(176, 0.5)
    mlp_saved = 6 * len(sparse_rows) * shape["num_hidden_layers"] * 3 * shape["hidden_size"] * (176 - k)  # fwd + 2 bwd
    assert flops["dense"] - flops["pruned"] == mlp_saved
    # the handle counts attention's score/value products too, which the counter does not see on the CPU
    tokens = args.batch * args.seq
    with_core = flops["dense"] + 6 * tokens * _attention_core_flops(handle._model_ref(), args.seq)
    assert mlp_saved == pytest.approx((1 - handle.kept_flops_fraction()) * with_core, rel=1e-9)


@pytest.mark.parametrize("lora", [False, True])
def test_benchmark_split_bound_is_the_dense_model_at_rate_zero(lora):
    """At rate 0 the split model computes the dense model's loss and gradients (with LoRA: the adapters',
    the base frozen); at rate 0.5 it computes another loss."""
    import torch

    benchmark = _load("benchmark")
    args = _split_args(benchmark, *(["--lora"] if lora else []))
    dense, split = benchmark.build(args), benchmark.build_split(args, 0.0)
    if lora:  # PEFT starts B at zero: give the adapters weight, so their gradients and outputs are not trivial
        with torch.no_grad():
            for a, b in zip(dense.parameters(), split.parameters()):
                if a.requires_grad:
                    a.normal_(0, 0.05, generator=torch.Generator().manual_seed(a.numel()))
                    b.copy_(a)
    ids = torch.randint(0, 256, (args.batch, args.seq))
    labels = ids.clone()
    labels[:, :16] = -100
    losses = [model(input_ids=ids, labels=labels).loss for model in (dense, split)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-5)
    for loss in losses:
        loss.backward()
    trained = [(a, b) for a, b in zip(dense.parameters(), split.parameters()) if a.requires_grad]
    assert len(trained) == (2 * 7 * 2 if lora else len(list(dense.parameters())))
    for a, b in trained:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    half = benchmark.build_split(args, 0.5)
    assert half(input_ids=ids, labels=labels).loss.item() != pytest.approx(losses[0].item(), rel=1e-5)


def test_benchmark_split_bound_is_timed(tmp_path):
    """A benchmark run with the split on reports a bound for each omit_in, with and without LoRA; none with
    Liger's fused SwiGLU (not built for it)."""
    benchmark = _load("benchmark")
    args = _split_args(benchmark)

    out = tmp_path / "rows.jsonl"
    for omit_in, lora in (("forward_backward", []), ("backward", []), ("forward_backward", ["--lora"])):
        benchmark.main([*SPLIT, "--omit-in", omit_in, *lora, "--warmup", "1", "--steps", "1", "--json", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["omit_in"], r["lora"]) for r in rows] == [
        ("forward_backward", False),
        ("backward", False),
        ("forward_backward", True),
    ]
    assert all(r["pruned_s"] > 0 and r["bound"] > 0 and r["of_bound"] > 0 for r in rows)
    assert not benchmark.has_bound(_split_args(benchmark, "--kernels", "liger"), benchmark.sat_config(args, "mlp", 0.5))


def test_lte_decode_times_dense_lte_and_a_bound_of_the_reached_width(tmp_path):
    """The smallest configuration: every variant gets a row with its timing keys; the bound's MLPs (every layer)
    have LTE's reached fraction of the width, LTE's keep the full width."""
    from sat_trainer.lte.model import lte_handle_of

    lte_decode = _load("lte_decode")
    argv = ["--shape", "tiny", "--expert-size", "16", "--active", "0.5", "--prompt", "4", "--new-tokens", "3"]
    args = lte_decode.parser().parse_args([*argv, "--warmup", "0", "--rounds", "1", "--json", str(tmp_path / "rows.jsonl")])
    models, info, _ = lte_decode.build_variants(args)
    assert list(models) == ["dense", "lte@0.5", "bound@0.5"]
    reached = info["lte@0.5"]["active_fraction"]
    assert 0 < reached < 1 and lte_handle_of(models["lte@0.5"]).stage == "hard"
    widths = {name: {layer.mlp.up_proj.weight.shape[0] for layer in m.model.layers} for name, m in models.items()}
    assert widths == {"dense": {128}, "lte@0.5": {128}, "bound@0.5": {round(reached * 128)}}

    rows = lte_decode.main([*argv, "--warmup", "0", "--rounds", "1", "--json", str(tmp_path / "rows.jsonl")])
    saved = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert saved == rows and [r["variant"] for r in rows] == ["dense", "lte", "bound"]
    keys = {"prefill_s", "decode_tokens_per_s", "decode_speedup", "active_fraction", "mlp_width", "target_active", "threads"}
    assert all(keys <= set(r) and r["prefill_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows)
    assert rows[0]["decode_speedup"] == 1.0 and "of_bound" in rows[1]
    assert rows[2]["mlp_width"] == round(rows[1]["active_fraction"] * 128) < 128


def test_lte_decode_times_a_saved_lte_folder(tmp_path):
    """--lte: the saved model is dense, its own routers and threshold are LTE; the bound narrows to the reached width."""
    from tiny import build

    from sat_trainer import apply_lte

    model = build("llama")
    handle = apply_lte(model, {"expert_size": 16, "threshold": 0.55})
    model.save_pretrained(tmp_path)
    handle.save(tmp_path)
    lte_decode = _load("lte_decode")
    rows = lte_decode.main(["--lte", str(tmp_path), "--prompt", "4", "--new-tokens", "3", "--warmup", "0", "--rounds", "1"])
    assert [r["variant"] for r in rows] == ["dense", "lte", "bound"] and rows[1]["threshold"] == 0.55
    assert rows[0]["mlp_width"] == rows[1]["mlp_width"] == 96 > rows[2]["mlp_width"] == round(rows[1]["active_fraction"] * 96)
