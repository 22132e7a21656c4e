"""layer_rates auto: the allocation (pure), the calibration's costs on a tiny model, and the
Trainer wiring (rates assigned at train start, kept in checkpoints)."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import CountingStream, build, sat_config

from sat_trainer import SATCallback, SATConfigError, apply_sat, importance
from sat_trainer.calibration import allocate, calibrate
from sat_trainer.patch.model import handle_of


def test_allocate_meets_the_flop_budget_on_the_cheapest_units():
    rates = [0.25, 0.5, 0.75]
    costs = [[0.1, 0.3, 0.9], [0.01, 0.02, 0.05], [0.02, 0.05, 0.2]]  # unit 1 is cheap, unit 0 dear
    assigned = allocate(costs, [1.0, 1.0, 1.0], rates, flop_budget=1.5, cost_budget=None)  # uniform 0.5 over 3 units
    assert sum(assigned) >= 1.5
    assert assigned[1] == 0.75 and assigned[0] < assigned[2] <= 0.75
    assert allocate(costs, [1.0, 1.0, 1.0], rates, flop_budget=0.0, cost_budget=None) == [0.0, 0.0, 0.0]


def test_allocate_with_a_cost_budget_saves_the_most_it_allows():
    rates = [0.25, 0.5, 0.75]
    costs = [[0.1, 0.3, 0.9], [0.01, 0.02, 0.05], [0.02, 0.05, 0.2]]
    assigned = allocate(costs, [1.0, 1.0, 1.0], rates, flop_budget=None, cost_budget=0.1)
    spent = sum(0.0 if r == 0 else c[rates.index(r)] for r, c in zip(assigned, costs))
    assert spent <= 0.1 and assigned == [0.0, 0.75, 0.5]
    assert allocate(costs, [1.0, 1.0, 1.0], rates, flop_budget=None, cost_budget=1e-6) == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained on the counting stream (so omitting channels costs loss), then with the MLPs
    of layers 1 and 2 shrunk 20x: layer 0's is the one whose omission costs most."""
    model = build("llama", num_hidden_layers=3).train()
    data = CountingStream(rows=64, length=24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        ids = data.ids[(step * 8) % 64 : (step * 8) % 64 + 8]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.down_proj.weight /= 20.0
    return model.state_dict()


def _model_with_a_dear_first_layer(state):
    model = build("llama", num_hidden_layers=3)
    model.load_state_dict(state)
    return model


def _batches():
    ids = CountingStream(rows=64, length=24).ids
    return [{"input_ids": ids[i : i + 8], "labels": ids[i : i + 8]} for i in (0, 8)]


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
def test_calibration_gives_the_dear_layer_less_and_meets_the_budget(trained, omit_in):
    model = _model_with_a_dear_first_layer(trained)
    handle = apply_sat(model, sat_config(targets=["mlp"], omission_rate=0.5, layer_rates="auto", omit_in=omit_in))
    batches = _batches()
    table = calibrate(handle, model, batches)
    rates = [row["rate"] for row in table["units"]]
    costs = [row["costs"] for row in table["units"]]
    assert all(c[0] <= c[-1] + 1e-6 for c in costs)  # omitting more costs more
    assert costs[0][1] > max(costs[1][1], costs[2][1])  # the scaled layer is the dear one
    assert rates[0] < min(rates[1:]) and sum(rates) >= 0.5 * 3 - 1e-9
    assert table["flops_saved_fraction_of_blocks"] == pytest.approx(sum(rates) / 3)
    handle.set_rate(0.5)  # the peak: each block at its own rate
    assert [u.k() for u in handle.units] == [round((1 - r) * 96 + 1e-9) for r in rates]
    handle.set_rate(0.25)  # a lower rung scales every block's rate alike
    assert [u.k() for u in handle.units] == [round((1 - r / 2) * 96 + 1e-9) for r in rates]
    model.train()
    handle.new_step()
    assert model(**batches[0]).loss.isfinite()  # draws after the calibration start afresh


def _backward_calibration_draws(trained, monkeypatch, targets: list[str], record) -> tuple[list, list]:
    """Calibrate ``targets`` under omit_in backward (activation scores from the forward by default) with a
    subsample floor that would score 20 of the batch's 192 tokens: (the scores of each block's draw, in
    order, what ``record(layer, seen)`` hooked into ``seen`` on each block's forward)."""
    from sat_trainer import calibration

    model = _model_with_a_dear_first_layer(trained)
    config = sat_config(
        targets=targets,
        omission_rate=0.5,
        layer_rates="auto",
        omit_in="backward",
        activation_tokens=16,
        activation_token_fraction=0.1,
    )  # a subsample would be 20 of 192 tokens
    handle = apply_sat(model, config)
    seen = []
    hooks = [record(layer, seen) for layer in model.model.layers]
    scored = []
    real = calibration._omitted_share
    monkeypatch.setattr(calibration, "_omitted_share", lambda scores, *a: scored.append(scores.clone()) or real(scores, *a))
    calibrate(handle, model, _batches())
    for h in hooks:
        h.remove()
    return scored[:: len(handle.config.calibration_rates)], seen


def test_backward_calibration_scores_every_channel_on_every_batch_as_training_does(trained, monkeypatch):
    """omit_in backward (activation scores from the forward by default): each calibration batch
    scores all channels from its own dense forward's down projection input, on every token, as a
    training draw does (not from a subsample, not a rotating window after the first batch)."""
    per_draw, downs = _backward_calibration_draws(
        trained,
        monkeypatch,
        ["mlp"],
        lambda layer, seen: layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append((m, a[0].detach().clone()))),
    )
    assert len(per_draw) == len(downs) == 6  # 2 batches x 3 blocks
    for scores, (down, hidden) in zip(per_draw, downs):
        full = importance.channel_rms(hidden.reshape(-1, hidden.shape[-1]), None) * importance.output_column_norms(down.weight)
        torch.testing.assert_close(scores, full)


def test_trainer_calibrates_at_train_start_and_keeps_the_rates_in_checkpoints(trained, tmp_path):
    model = _model_with_a_dear_first_layer(trained)
    callback = SATCallback(
        sat_config(targets=["mlp"], omission_rate=0.5, layer_rates="auto", calibration_batches=1, metric="activation")
    )
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    transformers.Trainer(model=model, args=args, train_dataset=CountingStream(rows=16, length=24), callbacks=[callback]).train()
    rates = [row["rate"] for row in callback.calibration["units"]]
    assert rates[0] < max(rates)
    assert [u.rate_scale for u in handle_of(model).units] == [r / 0.5 for r in rates]
    assert callback.state()["attributes"]["calibration"] == callback.calibration


def test_bad_calibration_settings_are_named():
    with pytest.raises(SATConfigError, match="calibration_rates"):
        sat_config(calibration_rates=[0.5, 0.25])
    with pytest.raises(SATConfigError, match="layer_rates"):
        sat_config(layer_rates="auto", omission_rate=0.0)
    with pytest.raises(SATConfigError, match="loss_budget"):
        sat_config(loss_budget=0)


def test_backward_calibration_scores_attention_from_each_batchs_values(trained, monkeypatch):
    """The same for attention's KV groups: each calibration batch scores them from its own dense
    forward's values (v_proj's output, every token), as a training draw does."""
    per_draw, values = _backward_calibration_draws(
        trained,
        monkeypatch,
        ["attention"],
        lambda layer, seen: layer.self_attn.v_proj.register_forward_hook(
            lambda m, a, out, o=layer.self_attn.o_proj: seen.append((o, out.detach().clone()))
        ),
    )
    assert len(per_draw) == len(values) == 6  # 2 batches x 3 blocks
    for scores, (o_proj, v) in zip(per_draw, values):
        torch.testing.assert_close(scores, importance.value_scores(v.reshape(-1, v.shape[-1]), o_proj.weight, 4))
