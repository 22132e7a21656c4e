"""EST (Evolving Subnetwork Training) as options of the one engine: ``rescale: inverse_keep``, whole decoder layers
as units (``targets`` with layers) and ``schedule: est``. Exact against the masked dense reference scaled and with
the skipped layers replaced by identities (tests/reference.py), under LoRA and gradient checkpointing; the stages'
rates step by step, in a Trainer and after a resume; the skipped set a function of (seed, draw) only; bad input."""

from __future__ import annotations

import copy
import types

import peft
import pytest
import torch
import transformers
from reference import loss_and_grads, masked
from tiny import CountingStream, batch, build, sat_config

from sat_trainer import SATCallback, SATConfig, SATConfigError, SATError, apply_sat, remove_sat
from sat_trainer import callback as callback_module
from sat_trainer.ops import SLICEABLE, weight_numel
from sat_trainer.patch.model import handle_of
from sat_trainer.schedule import axis_rates_at, omission_rate_at, step_rates

ALL = ["mlp", "attention", "layers"]
HALF = {"mlp": 0.5, "attention": 0.5, "layers": 0.5}
STAGES = [
    {"fraction": 0.4, "layers": 0.5, "heads": 0.5, "channels": 0.5},
    {"fraction": 0.3, "heads": 0.5, "channels": 0.75},
    {"fraction": 0.3},
]
EST = {"targets": ALL, "metric": "uniform", "rescale": "inverse_keep", "schedule": "est", "est_stages": STAGES}


def _layers(model):
    """The decoder layers of a tiny model of any family."""
    inner = getattr(model, "model", None) or model.transformer
    return getattr(inner, "layers", None) or getattr(inner, "h", None) or inner.decoder.layers


def _est(model, rates=None, **cfg):
    """Patch ``model`` for EST (every axis, rescaled, uniform draws), set per-target ``rates`` in training mode, draw."""
    handle = apply_sat(model, sat_config(**{**EST, "schedule": "constant", "est_stages": None, **cfg}))
    model.train()
    handle.set_rate(HALF if rates is None else rates)
    handle.new_step()
    return handle


def _assert_exact(model, reference, handle, ids):
    """Logits, loss and every gradient (None where the reference's is None) equal the reference's for this draw."""
    loss, logits, grads = loss_and_grads(model, ids)
    with masked(reference, handle):
        ref_loss, ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    return logits, grads


# ---- rescale -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gpt2"])
@pytest.mark.parametrize("attention_unit", ["kv_group", "query_head"])
def test_rescale_equals_the_scaled_masked_reference(family, attention_unit):
    """rescale inverse_keep: each sliced block's kept units' outputs times n / k, bias not scaled (llama has biases);
    exact against the masked reference scaled the same way, and different from the unscaled one."""
    model = build(family)
    reference = copy.deepcopy(model).train()
    handle = _est(model, {"mlp": 0.5, "attention": 0.5}, targets=["mlp", "attention"], attention_unit=attention_unit)
    assert all(u.k() < u.n for u in handle.units) and {u.n / u.k() for u in handle.units} == {2.0}
    logits, _ = _assert_exact(model, reference, handle, batch())
    unscaled = copy.copy(handle)
    unscaled.config = SATConfig(**{**handle.config.to_dict(), "rescale": "none"})
    with torch.no_grad(), masked(reference, unscaled):
        assert not torch.allclose(reference(batch()).logits, logits, atol=1e-3)
    remove_sat(model)


def test_rescale_only_while_sparse():
    """At rate 0 and in eval the original forwards run: no scaling."""
    model = build("llama")
    dense = copy.deepcopy(model).train()
    handle = _est(model, {"mlp": 0.5, "attention": 0.5}, targets=["mlp", "attention"])
    ids = batch()
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense(ids).logits, atol=1e-3)
        handle.set_rate(0.0)
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=0, rtol=0)
        handle.set_rate(0.5)
        model.eval()
        dense.eval()
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=0, rtol=0)
    remove_sat(model)


# ---- the layer unit ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3"])
@pytest.mark.parametrize("targets", [ALL, ["layers"]])
def test_skipped_layers_are_identities_that_run_nothing(family, targets):
    """A skipped layer returns its input: exact against the reference whose skipped layers are identities (every
    gradient; a skipped layer's parameters get None, as there); none of its modules runs."""
    model = build(family, num_hidden_layers=4)
    reference = copy.deepcopy(model).train()
    handle = _est(model, {t: 0.5 for t in targets}, targets=targets)
    skipped = handle.skipped_layers()
    assert len(skipped) == 2
    ran = set()
    for index, layer in enumerate(_layers(model)):
        for module in list(layer.modules())[1:]:  # the layer's own hooks fire either way: it is still called
            module.register_forward_hook(lambda *a, i=index: ran.add(i))
    _, grads = _assert_exact(model, reference, handle, batch())
    assert ran == set(range(4)) - set(skipped)
    for index, layer in enumerate(_layers(model)):
        got = {name for name, _ in layer.named_parameters() if f"{_prefix(model)}.{index}.{name}" in grads}
        assert got == (set() if index in skipped else {name for name, _ in layer.named_parameters()}), index
    remove_sat(model)
    assert all("forward" not in layer.__dict__ for layer in _layers(model))


def _prefix(model) -> str:
    return {"gpt2": "transformer.h", "opt": "model.decoder.layers"}.get(model.config.model_type, "model.layers")


def test_layers_skip_only_in_a_training_forward_with_gradients():
    """eval, and a training-mode forward without gradients (generate), run every layer: the dense logits."""
    model = build("llama", num_hidden_layers=4)
    dense = copy.deepcopy(model)
    handle = _est(model, {"layers": 0.5}, targets=["layers"])
    assert handle.skipped_layers()
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense.train()(ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(model.eval()(ids).logits, dense.eval()(ids).logits, atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(ids).logits.detach(), dense(ids).logits.detach(), atol=1e-3)
    remove_sat(model)


def test_skipped_set_depends_only_on_seed_and_draw():
    """Two models (two handles, as two ranks) with one seed skip the same layers at every draw; the set changes
    between draws, is uniform over the eligible layers, and another seed draws other sets. dense_layers never skip."""
    handles = [_est(build("llama", num_hidden_layers=6), {"layers": 0.5}, targets=["layers"], seed=7) for _ in range(2)]
    other = _est(build("llama", num_hidden_layers=6), {"layers": 0.5}, targets=["layers"], seed=8)
    dense_kept = _est(build("llama", num_hidden_layers=6), {"layers": 0.5}, targets=["layers"], seed=7, dense_layers=[0, -1])
    sets, counts = [], torch.zeros(6)
    for draw in range(1, 301):
        for handle in (*handles, other, dense_kept):
            handle.start_draw(draw)
        a, b = handles[0].skipped_layers(), handles[1].skipped_layers()
        assert a == b and len(a) == 3
        assert len(dense_kept.skipped_layers()) == 2 and not {0, 5} & set(dense_kept.skipped_layers())
        sets.append(tuple(a))
        counts[a] += 1
    assert len(set(sets)) == 20  # every 3-subset of 6 layers occurs
    assert counts.min() > 0.4 * 300 and counts.max() < 0.6 * 300
    assert any(other.start_draw(d) or other.skipped_layers() != list(sets[d - 1]) for d in range(1, 11))


def test_metric_uniform_keeps_a_fresh_uniform_subset_each_draw():
    """metric uniform (topk over random scores): per draw a new kept set, every channel kept about half the time,
    and the same set on another model for the same (seed, draw)."""
    models = [build("llama"), build("llama", seed=5)]
    handles = [_est(m, {"mlp": 0.5}, targets=["mlp"]) for m in models]
    counts, sets = torch.zeros(96), set()
    for draw in range(1, 101):
        kept = []
        for model, handle in zip(models, handles):
            handle.start_draw(draw)
            with torch.no_grad():
                model(batch(seed=draw))
            kept.append(handle.kept()["model.layers.0.mlp"])
        assert torch.equal(kept[0], kept[1]) and kept[0].numel() == 48
        counts[kept[0]] += 1
        sets.add(tuple(kept[0].tolist()))
    assert len(sets) == 100 and counts.min() > 25 and counts.max() < 75


def test_kept_flops_count_skipped_layers_whole():
    model = build("llama", num_hidden_layers=4)
    handle = _est(model, {"layers": 0.5}, targets=["layers"])
    layers = _layers(model)
    per_layer = sum(weight_numel(m) for m in layers[0].modules() if isinstance(m, SLICEABLE))
    dense = sum(weight_numel(m) for m in model.modules() if isinstance(m, SLICEABLE))
    model(batch())
    core = 2.0 * 16 * 8 * 16  # per token per layer: QK^T and AV at length 16, 8 heads of 16
    assert handle.kept_flops_fraction() == pytest.approx((dense + 4 * core - 2 * (per_layer + core)) / (dense + 4 * core))


def test_set_rate_per_target_is_checked():
    handle = _est(build("llama", num_hidden_layers=4))
    assert handle.rate == 0.5 and handle.context.rate_for("layers") == 0.5
    handle.set_rate({"mlp": 0.25})
    assert (
        handle.rate == 0.25 and handle.skipped_layers() == [] and all(u.k() == u.n for u in handle.units if u.kind == "attention")
    )
    with pytest.raises(SATError, match="'heads'; allowed targets: mlp, attention, layers"):
        handle.set_rate({"heads": 0.5})
    with pytest.raises(SATError, match=r"\[0, 1\), got 1.0 for layers"):
        handle.set_rate({"layers": 1.0})


# ---- gradient checkpointing and LoRA -----------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_skips_without_a_checkpoint_and_stays_exact(reentrant):
    """Checkpointed and plain EST steps give the same loss and gradients; a skipped layer calls no checkpoint."""
    base = build("llama", num_hidden_layers=4)
    checkpointed = copy.deepcopy(base)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    results, checkpoints = [], []
    for model in (base, checkpointed):
        handle = _est(model)
        for layer in _layers(model):
            if layer.gradient_checkpointing:
                inner = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, f=inner, **k: (checkpoints.append(1), f(*a, **k))[1]
        results.append(loss_and_grads(model, batch()))
    assert len(checkpoints) == 4 - len(handle.skipped_layers()) == 2
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    assert results[0][2].keys() == results[1][2].keys()
    for name, grad in results[0][2].items():
        torch.testing.assert_close(grad, results[1][2][name], atol=1e-6, rtol=1e-5, msg=name)


def _lora(model):
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    # init_lora_weights False: a non-zero B, so the adapters' own gradients are checked too
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_est_step_is_exact(checkpointing):
    """Under LoRA (adapters on every projection), rescaled and with skipped layers: exact against the reference;
    with checkpointing too (the same gradients as without)."""
    model = _lora(build("llama", num_hidden_layers=4))
    reference = copy.deepcopy(model).train()
    if checkpointing:
        model.enable_input_require_grads()
        model.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    handle = _est(model)
    assert len(handle.skipped_layers()) == 2
    _, grads = _assert_exact(model, reference, handle, batch())
    assert any("lora_A" in n for n in grads) and not any(f"layers.{handle.skipped_layers()[0]}." in n for n in grads)
    remove_sat(model)


# ---- the schedule -----------------------------------------------------------------------------------------


def test_est_stages_step_by_step():
    cfg = SATConfig(**EST, omit_in="forward_backward", dense_warmup_fraction=0.0)
    rates = [axis_rates_at(cfg, s, 10) for s in range(10)]
    first, second, dense = (
        {"mlp": 0.5, "attention": 0.5, "layers": 0.5},
        {"mlp": 0.25, "attention": 0.5, "layers": 0.0},
        {"mlp": 0.0, "attention": 0.0, "layers": 0.0},
    )
    assert rates == [first] * 4 + [second] * 3 + [dense] * 3
    assert step_rates(cfg, 5, 10) == second and step_rates(sat_config(schedule="constant"), 5, 10) == 0.25
    with pytest.raises(ValueError, match="axis_rates_at"):
        omission_rate_at(cfg, 0, 10)


def test_est_stages_follow_the_dense_start_and_the_targets():
    """The stages share the steps after dense_warmup_fraction; only cfg.targets get a rate."""
    cfg = SATConfig(
        targets=["mlp"],
        omit_in="forward_backward",
        schedule="est",
        est_stages=[{"fraction": 0.5, "channels": 0.5}, {"fraction": 0.5}],
        dense_warmup_fraction=0.2,
    )
    assert [axis_rates_at(cfg, s, 10)["mlp"] for s in range(10)] == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert set(axis_rates_at(cfg, 3, 10)) == {"mlp"}


class _Recorder(transformers.TrainerCallback):
    """The layers each optimizer step skipped and the MLP kept counts, read before the optimizer step."""

    def __init__(self):
        self.steps = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        handle = handle_of(model)
        mlp = next(u for u in handle.units if u.kind == "mlp")
        self.steps[state.global_step] = (handle.skipped_layers(), mlp.k())


def _train(out, recorder, resume=None, seed=0, **args):
    targs = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=1,
        save_steps=5,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
        disable_tqdm=True,
        **args,
    )
    config = {**EST, "omit_in": "forward_backward", "dense_warmup_fraction": 0.0, "seed": 3}
    model = build("llama", seed=seed, num_hidden_layers=4)
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=CountingStream(), callbacks=[SATCallback(config), recorder]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, SATConfig(**config)


def test_trainer_runs_the_stages_with_checkpointing_and_resumes_the_same_draws(tmp_path):
    """In a Trainer (activation checkpointing, 2 micro-batches per step): each step's per-target rates in the logs
    are the schedule's, stage 1 skips half the layers, later stages none; a run resumed from step 5 skips the same
    layers and ends with the same losses."""
    recorder = _Recorder()
    trainer, cfg = _train(tmp_path / "full", recorder, activation_checkpointing=True)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    for row in rows:
        expected = axis_rates_at(cfg, row["step"] - 1, 10)
        assert {t: row[f"sat/omission_rate_{t}"] for t in ALL} == pytest.approx(expected)
    assert [len(recorder.steps[s][0]) for s in range(10)] == [2] * 4 + [0] * 6
    assert [recorder.steps[s][1] for s in range(10)] == [48] * 4 + [72] * 3 + [96] * 3
    assert len({tuple(recorder.steps[s][0]) for s in range(4)}) > 1
    resumed_recorder = _Recorder()
    resumed, _ = _train(
        tmp_path / "again",
        resumed_recorder,
        resume=str(tmp_path / "full" / "checkpoint-5"),
        seed=9,
        activation_checkpointing=True,
    )
    assert resumed_recorder.steps == {s: recorder.steps[s] for s in range(5, 10)}
    again = [r["loss"] for r in resumed.state.log_history if "loss" in r and r["step"] > 5]
    assert again == pytest.approx([r["loss"] for r in rows[5:]], rel=1e-4)


@pytest.mark.parametrize("find_unused,checkpointing,refused", [(None, True, True), (None, False, False), (True, True, False)])
def test_layers_under_ddp_need_find_unused_parameters(monkeypatch, find_unused, checkpointing, refused):
    monkeypatch.setattr(callback_module, "_ddp", lambda: True)
    args = types.SimpleNamespace(ddp_find_unused_parameters=find_unused, activation_checkpointing=checkpointing)
    check = callback_module._refuse_skipped_layers_without_unused_parameters
    config = SATConfig(targets=ALL, omit_in="forward_backward")
    if refused:
        with pytest.raises(SATError, match="ddp_find_unused_parameters=True"):
            check(config, args, build("llama"))
    else:
        check(config, args, build("llama"))
    check(SATConfig(), args, build("llama"))  # no layers: nothing to refuse


# ---- bad input --------------------------------------------------------------------------------------------


BASE = {"targets": ALL, "omit_in": "forward_backward", "schedule": "est"}


@pytest.mark.parametrize(
    "data,key,value,fragment",
    [
        ({**BASE, "est_stages": [{"fraction": 1.0, "channels": 1.5}]}, "est_stages[0].channels", 1.5, "keep fraction in (0, 1]"),
        ({**BASE, "est_stages": [{"fraction": 1.0, "layers": 0}]}, "est_stages[0].layers", 0.0, "keep fraction in (0, 1]"),
        ({**BASE, "est_stages": [{"fraction": 0.5}, {"fraction": 0.4}]}, "est_stages", None, "add up to 0.9"),
        ({**BASE, "est_stages": [{"fraction": 0.0}, {"fraction": 1.0}]}, "est_stages[0].fraction", 0.0, "share of the scheduled"),
        ({**BASE, "est_stages": [{"fraction": 1.0, "width": 0.5}]}, "est_stages", None, "fraction and any of layers, heads"),
        ({**BASE, "est_stages": [{"layers": 0.5}]}, "est_stages", None, "a mapping with a fraction"),
        ({**BASE, "est_stages": []}, "est_stages", None, "non-empty list of stages"),
        ({**BASE, "est_stages": [{"fraction": 1.0, "heads": True}]}, "est_stages", None, "keep fractions in (0, 1]"),
        ({"est_stages": [{"fraction": 1.0}]}, "est_stages", None, "null unless schedule is est"),
        ({**BASE}, "schedule", "est", "est only with est_stages set"),
        (
            {**BASE, "targets": ["mlp"], "est_stages": [{"fraction": 1.0, "heads": 0.5}]},
            "est_stages[0].heads",
            0.5,
            "1 unless targets include attention",
        ),
        (
            {**BASE, "targets": ["mlp"], "est_stages": [{"fraction": 1.0}], "layer_rates": "auto"},
            "layer_rates",
            "auto",
            "schedule est",
        ),
        ({"rescale": "inverse_keep"}, "rescale", "inverse_keep", "omit_in forward_backward"),
        ({"rescale": "by_two"}, "rescale", "by_two", "none, inverse_keep"),
        (
            {"rescale": "inverse_keep", "omit_in": "forward_backward", "compensation": "mean"},
            "rescale",
            "inverse_keep",
            "compensation none",
        ),
        ({"targets": ["mlp", "layers"]}, "targets", ["mlp", "layers"], "omit_in forward_backward"),
        ({"targets": ["layers"], "omit_in": "forward_backward", "layer_rates": "auto"}, "layer_rates", "auto", "whole layers"),
    ],
)
def test_bad_est_input_names_key_value_and_allowed(data, key, value, fragment):
    with pytest.raises(SATConfigError) as err:
        SATConfig.from_dict(data)
    message = str(err.value)
    assert f"key {key!r} has invalid value" in message and fragment in message, message
    if value is not None:
        assert f"invalid value {value!r};" in message, message


def test_layers_with_every_layer_dense_is_refused():
    with pytest.raises(SATError, match="no decoder layer of LlamaForCausalLM outside dense_layers"):
        apply_sat(build("llama"), SATConfig(targets=["layers"], omit_in="forward_backward", dense_layers=[0, 1]))
