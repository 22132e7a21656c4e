"""SATCallback in a real `transformers.Trainer`: schedule in the logs, falling loss, plain
checkpoints (loaded in a process that never imports sat_trainer), and exact resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from tiny import CountingStream, batch, build, sat_config, sparse

from sat_trainer import SATCallback
from sat_trainer.patch.model import handle_of
from sat_trainer.schedule import omission_rate_at

STEPS = 32
SAT = sat_config(omission_rate=0.5, metric="uniform", ladder_sparse_fraction=0.5, ladder_num_rungs=2, seed=3)


def _stream() -> CountingStream:
    """The learnable stream these runs train on."""
    return CountingStream(rows=256, length=24)


class _KeptRecorder(transformers.TrainerCallback):
    """Kept sets of every optimizer step, read after the step's forward and backward."""

    def __init__(self):
        self.kept = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.kept[state.global_step] = {n: k.tolist() for n, k in handle_of(model).kept().items()}


def _trainer(out, model, recorder, **args):
    targs = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=16,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        disable_tqdm=True,
        **args,
    )
    return transformers.Trainer(model=model, args=targs, train_dataset=_stream(), callbacks=[SATCallback(SAT), recorder])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recorder = _KeptRecorder()
    trainer = _trainer(out, build("llama"), recorder)
    trainer.train()
    trainer.save_model(str(out / "final"))
    return out, trainer, recorder


def test_logs_follow_the_ladder_and_loss_falls(full_run):
    _, trainer, recorder = full_run
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # the row logged after optimizer step s (1-based) reports the rate that step trained at
    assert [r["sat/omission_rate"] for r in rows] == [
        pytest.approx(omission_rate_at(SAT, s - 1, STEPS)) for s in range(1, STEPS + 1)
    ]
    assert rows[0]["sat/omission_rate"] == 0.5 and rows[-1]["sat/omission_rate"] == 0.0
    assert rows[0]["sat/kept_flops_fraction"] < 0.75 and rows[-1]["sat/kept_flops_fraction"] == 1.0
    assert all(r["sat/tokens_per_second"] > 0 for r in rows)
    assert sum(r["loss"] for r in rows[-4:]) / 4 < 0.5 * sum(r["loss"] for r in rows[:4]) / 4
    sizes = {s: {len(k) for k in kept.values()} for s, kept in recorder.kept.items()}
    assert sizes[0] == {48, 4} and sizes[STEPS - 1] == {96, 8}  # mlp channels / query heads kept


@pytest.mark.slow
def test_checkpoint_loads_with_plain_transformers_in_a_fresh_process(full_run, tmp_path):
    out, trainer, _ = full_run
    ids = _stream().ids[:2]
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    script = (
        "import sys, torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out / 'final')!r}).eval()\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})\n"
        "assert 'sat_trainer' not in sys.modules\n"
    )
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("restore_callbacks", [False, True])
def test_resume_continues_the_same_schedule_and_draws(full_run, tmp_path, restore_callbacks):
    out, trainer, recorder = full_run
    checkpoint = out / "checkpoint-16"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["SATCallback"]
    assert saved["attributes"]["draw_id"] == 16 and saved["args"]["config"]["seed"] == 3

    resumed_recorder = _KeptRecorder()
    resumed = _trainer(
        tmp_path, build("llama", seed=99), resumed_recorder, restore_callback_states_from_checkpoint=restore_callbacks
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    first = {r["step"]: r for r in trainer.state.log_history if "loss" in r}
    again = {r["step"]: r for r in resumed.state.log_history if "loss" in r and r["step"] > 16}
    assert sorted(again) == list(range(17, STEPS + 1))
    assert {s: resumed_recorder.kept[s] for s in resumed_recorder.kept} == {s: recorder.kept[s] for s in resumed_recorder.kept}
    for step, row in again.items():
        assert row["sat/omission_rate"] == first[step]["sat/omission_rate"]
        assert row["loss"] == pytest.approx(first[step]["loss"], rel=1e-4)


class _RowWatcher(transformers.TrainerCallback):
    """gate_proj and o_proj weights of layer 0 before and after each optimizer step, with the kept set."""

    def __init__(self):
        self.records = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        layer = model.model.layers[0]
        kept = handle_of(model).kept()
        self._before = (
            layer.mlp.gate_proj.weight.detach().clone(),
            layer.self_attn.o_proj.weight.detach().clone(),
            kept["model.layers.0.mlp"],
            kept["model.layers.0.self_attn"],
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        layer = model.model.layers[0]
        self.records.append(
            (*self._before, layer.mlp.gate_proj.weight.detach().clone(), layer.self_attn.o_proj.weight.detach().clone())
        )


@pytest.mark.parametrize("mode", ["optimizer", "freeze"])
def test_omitted_update_modes(tmp_path, mode):
    watcher = _RowWatcher()
    sat = sat_config(omission_rate=0.5, schedule="constant", omitted_update=mode)
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        report_to=[],
        use_cpu=True,
        optim="adamw_torch",
        disable_tqdm=True,
        save_strategy="no",
    )
    transformers.Trainer(model=build("llama"), args=targs, train_dataset=_stream(), callbacks=[SATCallback(sat), watcher]).train()
    for step, (gate0, o0, channels, heads, gate1, o1) in enumerate(watcher.records):
        omitted = torch.ones(96, dtype=torch.bool)
        omitted[channels] = False
        head_cols = torch.ones(128, dtype=torch.bool)
        head_cols[(heads.unsqueeze(1) * 16 + torch.arange(16)).flatten()] = False
        assert not torch.equal(gate1[~omitted], gate0[~omitted])  # kept rows train
        frozen = torch.equal(gate1[omitted], gate0[omitted]) and torch.equal(o1[:, head_cols], o0[:, head_cols])
        # with "optimizer", weight decay (and momentum from step 2 on) moves omitted rows too
        assert frozen == (mode == "freeze"), (step, mode)


class _MomentumWatcher(transformers.TrainerCallback):
    """After SATCallback's on_pre_optimizer_step: layer 0's gate_proj gradient and AdamW first moment, and the kept set."""

    def __init__(self):
        self.records = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        weight = model.model.layers[0].mlp.gate_proj.weight
        moment = optimizer.optimizer.state.get(weight, {}).get("exp_avg")
        kept = handle_of(model).kept()["model.layers.0.mlp"]
        self.records.append((weight.grad.clone(), None if moment is None else moment.clone(), kept))


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
def test_omitted_update_momentum_continues_the_first_moment(tmp_path, omit_in):
    """omitted_update momentum: from the second step on, the omitted rows' gradient at the optimizer
    step is their AdamW first moment (so the moment stays as it was); kept rows keep their own."""
    watcher = _MomentumWatcher()
    sat = sat_config(omission_rate=0.5, schedule="constant", targets=["mlp"], omit_in=omit_in, omitted_update="momentum")
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        optim="adamw_torch",
        disable_tqdm=True,
        save_strategy="no",
    )
    transformers.Trainer(model=build("llama"), args=targs, train_dataset=_stream(), callbacks=[SATCallback(sat), watcher]).train()
    (grad0, moment0, _), *later = watcher.records
    assert moment0 is None and torch.count_nonzero(grad0) > 0
    for grad, moment, kept in later:
        omitted = torch.ones(96, dtype=torch.bool)
        omitted[kept] = False
        torch.testing.assert_close(grad[omitted], moment[omitted], atol=0, rtol=0)
        assert not torch.equal(grad[~omitted], moment[~omitted])  # kept rows: this step's own gradient
        assert torch.count_nonzero(moment[omitted]) > 0


@pytest.mark.slow
@pytest.mark.parametrize("decay", [1.0, 0.97, 0.9, 0.0])
def test_momentum_decay_scales_the_omitted_first_moment(decay):
    """momentum_decay d: after an AdamW step (beta1 0.8 here, not the default) every omitted slice's
    first moment is d times what it was; kept slices' moments take their own gradient. d = beta1 is
    what omitted_update optimizer does (zero gradient), d = 0 stops the continued update."""
    from sat_trainer.omitted_update import continue_momentum

    model = build("llama")
    handle = sparse(model, targets=["mlp", "attention"], omitted_update="momentum", momentum_decay=decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.999))
    handle.set_rate(0.0)
    handle.new_step()
    model(batch(), labels=batch()).loss.backward()
    optimizer.step()  # a dense step: every slice's first moment is nonzero
    optimizer.zero_grad()
    handle.set_rate(0.5)
    handle.new_step()
    model(batch(seed=2), labels=batch(seed=2)).loss.backward()
    slices = [s for u in handle.units for s in u.omitted_parameters()]
    assert sum(t.dim() == 2 for t, _, _ in slices) >= 8  # MLP rows and columns, attention groups (and biases)
    before = [optimizer.state[t]["exp_avg"].index_select(dim, idx).clone() for t, dim, idx in slices]
    continue_momentum(handle, optimizer, decay)
    optimizer.step()
    for (tensor, dim, idx), moment in zip(slices, before):
        assert torch.count_nonzero(moment) > 0
        torch.testing.assert_close(
            optimizer.state[tensor]["exp_avg"].index_select(dim, idx), decay * moment, atol=1e-7, rtol=1e-6
        )


def test_omitted_update_momentum_refuses_an_optimizer_without_a_first_moment():
    from sat_trainer import SATError
    from sat_trainer.omitted_update import continue_momentum

    model = build("llama")
    handle = sparse(model, targets=["mlp"], omitted_update="momentum")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(batch(), labels=batch()).loss.backward()
    optimizer.step()  # SGD's state: a momentum buffer, no exp_avg
    with pytest.raises(SATError, match="needs an Adam-family optimizer"):
        continue_momentum(handle, optimizer)


@pytest.mark.parametrize("mode", ["freeze", "momentum"])
def test_omitted_update_that_acts_before_the_step_is_refused_under_deepspeed(mode):
    """accelerate steps a DeepSpeed engine inside backward, before on_pre_optimizer_step: freeze
    would save weights that already moved, momentum would write gradients already consumed, so
    both are refused by name instead of doing nothing."""
    from types import SimpleNamespace

    from sat_trainer import SATError

    callback = SATCallback(sat_config(omitted_update=mode))
    args = SimpleNamespace(deepspeed={"zero_optimization": {"stage": 2}})
    with pytest.raises(SATError, match=f"omitted_update '{mode}' cannot run under DeepSpeed"):
        callback.on_train_begin(args, transformers.TrainerState(), transformers.TrainerControl(), model=build("llama"))


@pytest.mark.parametrize("max_grad_norm, refused", [(0.0, True), (1.0, False)])
def test_omitted_update_momentum_under_fp16_needs_clipping(max_grad_norm, refused):
    """Without clipping, fp16's gradients are still loss-scaled when on_pre_optimizer_step runs;
    the unscaled first moment written there would be divided by the scale again."""
    from types import SimpleNamespace

    from sat_trainer import SATError

    callback = SATCallback(sat_config(omitted_update="momentum"))
    args = SimpleNamespace(deepspeed=None, fp16=True, max_grad_norm=max_grad_norm)
    begin = lambda: callback.on_train_begin(
        args, transformers.TrainerState(), transformers.TrainerControl(), model=build("llama")
    )
    if refused:
        with pytest.raises(SATError, match="under fp16 needs max_grad_norm > 0"):
            begin()
    else:
        begin()
        assert callback.handle is not None
