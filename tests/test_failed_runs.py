"""Runs that go wrong: a diverged run stops with one line and exit 1, saves no NaN model and
writes strict JSON; skipped steps can be allowed; the last train loss is recorded however short
the run; a run that fails before writing anything leaves no empty run folder."""

from __future__ import annotations

import json

import pytest
import transformers
from tiny import demo_run_args

from sat_trainer.app.cli import main

# Adam moves every weight by about the learning rate: after step 1 the weights are ~1e30 and
# the next forward overflows, so step 2's loss and gradients are NaN, deterministically.
DIVERGE = ("training.learning_rate=1e30", "training.warmup_steps=0", "training.max_grad_norm=0")


def _strict(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds bare {c}"))


def test_diverged_run_stops_with_one_line_and_no_final_model(tiny_base, tmp_path, capsys):
    assert main(demo_run_args("cpt", tiny_base, tmp_path, 6, *DIVERGE)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("sat-train: error: training diverged at step 2")
    report = _strict(tmp_path / "report.json")
    assert report["status"] == "diverged" and report["diverged_at_step"] == 2 and report["steps"] == 2
    assert not (tmp_path / "final").exists()


@pytest.mark.slow
def test_skipped_steps_are_allowed_up_to_the_limit(tiny_base, tmp_path):
    assert main(demo_run_args("cpt", tiny_base, tmp_path, 6, *DIVERGE, "max_skipped_steps=2")) == 1
    report = _strict(tmp_path / "report.json")
    assert report["skipped_steps"] == [2, 3, 4] and report["diverged_at_step"] == 4


@pytest.mark.slow
def test_final_train_loss_when_max_steps_is_below_logging_steps(tiny_base, tmp_path):
    assert main(demo_run_args("cpt", tiny_base, tmp_path, 2, "training.logging_steps=10")) == 0
    report = _strict(tmp_path / "report.json")
    assert report["status"] == "completed" and report["final_train_loss"] > 0
    assert [r["step"] for r in report["history"]["train_loss"]] == [2]


@pytest.mark.slow
def test_failed_run_leaves_no_empty_run_folder(tiny_base, tmp_path, monkeypatch):
    def out_of_memory(self, *args, **kwargs):  # fails after the Trainer made the run folder
        raise RuntimeError("out of memory")

    monkeypatch.setattr(transformers.Trainer, "train", out_of_memory)
    out = tmp_path / "runs" / "r"
    with pytest.raises(RuntimeError, match="out of memory"):
        main([*demo_run_args("cpt", tiny_base, out), "--compare-dense"])
    assert not (tmp_path / "runs").exists()  # run folder and the parent it made: gone


def test_final_model_with_non_finite_weights_is_never_saved(tmp_path):
    """The last line of defence, whatever made the weights non-finite."""
    import torch
    from tiny import build

    from sat_trainer.app.run import _save_final
    from sat_trainer.errors import SATTrainingError

    model = build("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(
        SATTrainingError,
        match=r"final/ not saved: 1 weight tensors are not finite \(first: model.layers.1.mlp.down_proj.weight\)",
    ):
        _save_final(model, None, tmp_path, lora=False)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("fused", [True, False])
def test_guard_skips_on_the_device_and_reads_the_flags_once_per_logging_step(fused):
    """Fused AdamW skips a non-finite step on the device (weights and moments untouched) and
    the flags reach the host only at a logging step; a non-fused optimizer is checked each step."""
    import torch
    from tiny import batch, build
    from transformers import TrainerControl, TrainerState

    from sat_trainer.app.guard import NonFiniteGuard

    model = build("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=False if not fused else None)
    guard, state, control = NonFiniteGuard(max_skipped=1), TrainerState(), TrainerControl()

    def step(poison: bool) -> None:
        model(batch(), labels=batch()).loss.backward()
        if poison:
            model.model.layers[0].mlp.up_proj.weight.grad[0, 0] = float("nan")
        guard.on_pre_optimizer_step(None, state, control, model=model, optimizer=optimizer)
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        guard.on_step_end(None, state, control)

    step(poison=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    step(poison=True)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # skipped: nothing moved
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(moments, model.parameters()))
    assert guard.reads == (0 if fused else 2) and guard.skipped == ([] if fused else [2])
    step(poison=True)
    control.should_log = True  # a logging step: the one host read of the flags so far (fused)
    guard.on_step_end(None, state, control)
    assert guard.skipped == [2, 3] and guard.diverged_at == 3 and control.should_training_stop
    assert guard.reads == (1 if fused else 3)
    control.should_log = False
    step(poison=False)
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())  # a finite step still trains
