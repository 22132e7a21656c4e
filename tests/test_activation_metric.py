"""The activation metric, score reuse (score_every), layers kept dense and the dense warm-up."""

from __future__ import annotations

import pytest
import torch
from tiny import batch, build, sat_config, sparse

from sat_trainer import SATConfig, SATError, apply_sat, importance
from sat_trainer.schedule import omission_rate_at


def _block_inputs(model, names):
    """The input of each named block's first projection, captured from one dense forward."""
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0])) for n in names]
    with torch.no_grad():
        model(batch(size=2, length=16))
    for h in hooks:
        h.remove()
    return seen


def test_activation_mlp_is_each_channels_output_norm_times_its_down_column():
    model = build("llama")
    mlp = model.model.layers[0].mlp
    x = _block_inputs(model, ["model.layers.0.mlp.gate_proj"])["model.layers.0.mlp.gate_proj"]
    tokens = x.reshape(-1, x.shape[-1])
    computed = importance.mlp_hidden(
        tokens, [mlp.gate_proj.weight, mlp.up_proj.weight], [mlp.gate_proj.bias, mlp.up_proj.bias], mlp.act_fn
    )
    got = importance.channel_rms(computed, None) * importance.output_column_norms(mlp.down_proj.weight)
    hidden = mlp.act_fn(mlp.gate_proj(tokens)) * mlp.up_proj(tokens)
    # channel j's term in the down projection, token by token: hidden[:, j] outer W_down[:, j]
    expected = torch.stack([(hidden[:, j : j + 1] * mlp.down_proj.weight[:, j]).norm() for j in range(hidden.shape[1])])
    torch.testing.assert_close(got, expected.detach() / tokens.shape[0] ** 0.5, rtol=1e-5, atol=1e-6)  # per token: RMS


def test_channel_rms_of_bf16_activations_accumulates_in_float32():
    """The RMS over tokens (a strided reduction) sums the squares in float32: 1e-4 relative error
    in bf16, where a bf16-accumulated norm was off by ~4e-3 (enough to reorder near-tied channels)."""
    torch.manual_seed(0)
    hidden = torch.randn(2048, 96) * torch.linspace(0.1, 3.0, 96)
    low = hidden.to(torch.bfloat16)
    exact = low.double().square().mean(0).sqrt()
    for got in (importance.channel_rms(low, None), importance.channel_rms(low, torch.ones(2048))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(
        importance.output_column_norms(low.t().contiguous().t()).double(), exact * 2048**0.5, rtol=1e-3, atol=0
    )


def test_activation_plain_mlp_uses_the_activation_and_transposed_conv1d():
    model = build("gpt2")
    handle = apply_sat(model, SATConfig(metric="activation", activation_tokens=1000))
    unit = handle.units[0]
    x = _block_inputs(model, ["transformer.h.0.mlp.c_fc"])["transformer.h.0.mlp.c_fc"]
    got = unit.scorer.scores(x, torch.Generator().manual_seed(0))
    mlp = model.transformer.h[0].mlp
    hidden = mlp.act(mlp.c_fc(x)).reshape(-1, 256)
    expected = hidden.norm(dim=0) / hidden.shape[0] ** 0.5 * mlp.c_proj.weight.norm(dim=1)  # RMS; Conv1D stores (in, out)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_activation_attention_is_value_through_output_norm_per_kv_group():
    model = build("llama")  # 8 query heads, 4 KV groups, head_dim 16
    attn = model.model.layers[0].self_attn
    x = _block_inputs(model, ["model.layers.0.self_attn.q_proj"])["model.layers.0.self_attn.q_proj"]
    tokens = x.reshape(-1, x.shape[-1])
    got = importance.activation_attention(tokens, attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, 4)
    values = attn.v_proj(tokens).reshape(-1, 4, 16)
    expected = []
    for g in range(4):
        written = [values[:, g] @ attn.o_proj.weight[:, h * 16 : (h + 1) * 16].t() for h in (2 * g, 2 * g + 1)]
        expected.append(torch.cat(written, 1).norm())
    torch.testing.assert_close(got, torch.stack(expected).detach(), rtol=1e-5, atol=1e-6)
    # the patched block scores its KV groups the same way (all tokens: a subsample larger than the batch)
    handle = apply_sat(model, sat_config(metric="activation", targets=["attention"], activation_tokens=1000))
    unit = next(u for u in handle.units if u.name == "model.layers.0.self_attn")
    torch.testing.assert_close(
        unit.scorer.scores(x, torch.Generator().manual_seed(0)), torch.stack(expected).detach(), rtol=1e-5, atol=1e-6
    )


def test_value_scores_weigh_each_tokens_square_per_head_and_per_group():
    """The second-moment form equals the per-token sum it replaces: sum_t w_t ||W_o[:, head] v_t||^2,
    per query head and summed over a group's heads, with 4 query heads reading 2 KV groups."""
    torch.manual_seed(0)
    values, o_weight, weights = torch.randn(10, 2 * 8), torch.randn(24, 4 * 8), torch.rand(10) * 3
    per_head = torch.stack(
        [
            (weights * (values[:, (h // 2) * 8 : (h // 2 + 1) * 8] @ o_weight[:, h * 8 : (h + 1) * 8].t()).square().sum(1)).sum()
            for h in range(4)
        ]
    )
    torch.testing.assert_close(importance.value_scores(values, o_weight, 2, True, weights), per_head.sqrt(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        importance.value_scores(values, o_weight, 2, False, weights), per_head.reshape(2, 2).sum(1).sqrt(), rtol=1e-5, atol=1e-6
    )


def test_activation_attention_of_a_fused_qkv_reads_its_value_rows():
    """Phi-3's qkv_proj holds [q | k | v] (8, 4, 4 heads of head_dim 16): a KV group is scored by
    its value rows (the last 64) through o_proj, as v_proj would be."""
    model = build("phi3")
    attn = model.model.layers[0].self_attn
    x = _block_inputs(model, ["model.layers.0.self_attn.qkv_proj"])["model.layers.0.self_attn.qkv_proj"]
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        values = attn.qkv_proj(tokens)[:, (8 + 4) * 16 :].reshape(-1, 4, 16)
        expected = []
        for g in range(4):
            written = [values[:, g] @ attn.o_proj.weight[:, h * 16 : (h + 1) * 16].t() for h in (2 * g, 2 * g + 1)]
            expected.append(torch.cat(written, 1).norm())
    handle = apply_sat(model, sat_config(metric="activation", targets=["attention"], activation_tokens=1000))
    unit = next(u for u in handle.units if u.name == "model.layers.0.self_attn")
    torch.testing.assert_close(
        unit.scorer.scores(x, torch.Generator().manual_seed(0)), torch.stack(expected), rtol=1e-5, atol=1e-6
    )


def test_activation_metric_omits_a_channel_that_writes_nothing():
    model = build("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5] = 0.0
        model.model.layers[0].mlp.down_proj.weight[:, 7] *= 100.0
    handle = apply_sat(model, sat_config(metric="activation", targets=["mlp"]))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    with torch.no_grad():
        model(batch())
    kept = handle.kept()["model.layers.0.mlp"].tolist()
    assert 5 not in kept and 7 in kept


def test_activation_subsample_size_bounds_the_tokens_scored(monkeypatch):
    sizes = []
    real = importance.mlp_hidden
    monkeypatch.setattr(importance, "mlp_hidden", lambda t, *a: sizes.append(t.shape[0]) or real(t, *a))
    model = build("llama")
    handle = apply_sat(model, sat_config(metric="activation", targets=["mlp"], activation_tokens=5))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    with torch.no_grad():
        model(batch(size=2, length=16))
    assert sizes == [5, 5]


def test_activation_subsample_is_a_fraction_of_the_batch_above_the_floor():
    assert importance.subsample_size(4096, 256, 0.125) == 512
    assert importance.subsample_size(512, 256, 0.125) == 256  # the floor
    assert importance.subsample_size(100, 256, 0.125) == 100  # never more than there are
    assert importance.subsample_size(33, 5, 0.5) == 17


def test_forward_scores_refresh_the_kept_channels_and_remeasure_a_window(monkeypatch):
    """activation_scores training_forward: after the first draw (every channel on the subsample), a draw
    pushes only a window of ceil(n / remeasure_every) contiguous channels through gate/up; the
    kept channels' RMS is the previous sparse forward's own (all its tokens); the windows come
    round to the start after remeasure_every draws."""
    rows = []
    real = importance.mlp_hidden
    monkeypatch.setattr(importance, "mlp_hidden", lambda t, w, *a: rows.append(w[0].shape[0]) or real(t, w, *a))
    model = build("llama")  # 96 MLP channels, 2 layers
    handle = apply_sat(
        model, sat_config(metric="activation", targets=["mlp"], activation_scores="training_forward", remeasure_every=4)
    )
    model.train()
    handle.set_rate(0.5)
    unit = handle.units[0]
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]))
    )
    for step in range(5):
        handle.new_step()
        model(batch(seed=step))
    hook.remove()
    assert rows == [96, 96] + [24] * 8  # two blocks: the first draw measures all, then one window per draw
    assert seen[-1].shape[1] == 48
    torch.testing.assert_close(unit.scorer.rms[unit.kept_units], seen[-1].norm(dim=0) / seen[-1].shape[0] ** 0.5)
    assert unit.scorer.window == 0  # 4 windows of 24 channels, one per draw after the first


def test_forward_scores_are_what_the_next_draw_keeps():
    """The draw after a sparse forward keeps the top channels by RMS x down column norm, where the
    RMS is that forward's own for the channels it kept, freshly measured for the first window
    (here on all tokens), and stored for the rest."""
    model = build("llama")
    handle = apply_sat(
        model, sat_config(metric="activation", targets=["mlp"], activation_scores="training_forward", activation_tokens=1000)
    )
    model.train()
    handle.set_rate(0.5)
    unit = handle.units[0]
    mlp = model.model.layers[0].mlp
    inputs = []
    hook = mlp.gate_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    handle.new_step()
    model(batch(seed=0))
    rms = unit.scorer.rms.clone()  # after the first forward: its kept channels refreshed
    handle.new_step()
    model(batch(seed=1))
    hook.remove()
    x = inputs[1]
    with torch.no_grad():
        hidden = mlp.act_fn(x @ mlp.gate_proj.weight[:12].t()) * (x @ mlp.up_proj.weight[:12].t())
        rms[:12] = hidden.norm(dim=0) / x.shape[0] ** 0.5  # the first window of ceil(96 / 8) channels
        expected = (rms * mlp.down_proj.weight.norm(dim=0)).topk(48).indices.sort().values
    assert torch.equal(unit.kept_units, expected)


def test_subsample_scores_measure_every_channel_each_draw(monkeypatch):
    rows = []
    real = importance.mlp_hidden
    monkeypatch.setattr(importance, "mlp_hidden", lambda t, w, *a: rows.append(w[0].shape[0]) or real(t, w, *a))
    model = build("llama")
    handle = apply_sat(model, sat_config(metric="activation", targets=["mlp"]))  # activation_scores subsample, the default
    model.train()
    handle.set_rate(0.5)
    for step in range(3):
        handle.new_step()
        model(batch(seed=step))
    assert rows == [96] * 6


def test_score_every_reuses_scores_between_rescorings(monkeypatch):
    calls = []
    real = importance.wanda
    monkeypatch.setattr(importance, "wanda", lambda *a: calls.append(1) or real(*a))
    model = build("llama")
    handle = apply_sat(model, sat_config(metric="wanda", targets=["mlp"], score_every=3))
    model.train()
    handle.set_rate(0.5)
    kept = []
    for step in range(7):
        handle.new_step()
        with torch.no_grad():
            model(batch(seed=step))  # new data every step: only a rescoring can change the set
        kept.append(handle.kept()["model.layers.0.mlp"].tolist())
    assert len(calls) == 2 * 3  # draws 1, 4, 7 score; two MLP blocks each
    assert kept[0] == kept[1] == kept[2] and kept[3] == kept[4] == kept[5]
    assert kept[2] != kept[3] or kept[5] != kept[6]


def test_dense_layers_are_never_patched_and_bad_indices_are_named():
    model = build("llama", num_hidden_layers=4)
    handle = apply_sat(model, sat_config(dense_layers=[0, -1]))
    assert sorted({u.name.split(".")[2] for u in handle.units}) == ["1", "2"]
    with pytest.raises(SATError, match=r"dense_layers.*\[4\].*4 layers.*-4\.\.3"):
        apply_sat(build("llama", num_hidden_layers=4), sat_config(dense_layers=[4]))


def test_dense_warmup_then_the_ladder_over_the_remaining_steps():
    cfg = sat_config(omission_rate=0.5, dense_warmup_fraction=0.1, ladder_sparse_fraction=0.5, ladder_num_rungs=1)
    rates = [omission_rate_at(cfg, s, 100) for s in range(100)]
    assert rates[:10] == [0.0] * 10
    assert rates[10:55] == [0.5] * 45 and rates[55:] == [0.0] * 45


@pytest.mark.parametrize("metric", ["activation", "wanda", "maxip"])
def test_padding_tokens_do_not_score(metric):
    """Scores of a padded batch equal those of its real tokens alone: pads (here made huge, as a
    stand-in for whatever the model computes on them) are zeroed and drawn last by subsamples."""
    model = build("llama")
    ids = batch(size=2, length=16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 6:] = 0  # 10 pads out of 32 tokens
    handle = apply_sat(model, sat_config(metric=metric, targets=["mlp"], activation_tokens=22, maxip_tokens=22))
    unit = handle.units[0]
    x = _block_inputs(model, ["model.layers.0.mlp.gate_proj"])["model.layers.0.mlp.gate_proj"].clone()
    with torch.no_grad():
        model(ids, attention_mask=mask)  # the model-level hook reads the mask
    x[1, 6:] = 1e3
    padded = unit.scorer.scores(x, torch.Generator().manual_seed(0))
    handle.token_mask = None
    real = unit.scorer.scores(torch.cat([x[0], x[1, :6]]).unsqueeze(0), torch.Generator().manual_seed(0))
    torch.testing.assert_close(padded, real, rtol=1e-5, atol=1e-5)


def test_activation_metric_reads_the_config_when_the_mlp_kernels_were_swapped():
    """Liger-Kernel replaces LlamaMLP by a fused SwiGLU module without ``act_fn``: scoring still works."""
    model = build("llama")
    handle = apply_sat(model, sat_config(metric="activation", targets=["mlp"], activation_tokens=1000))
    mlp = model.model.layers[0].mlp
    x = _block_inputs(model, ["model.layers.0.mlp.gate_proj"])["model.layers.0.mlp.gate_proj"]
    expected = handle.units[0].scorer.scores(x, torch.Generator().manual_seed(0))
    mlp.config = model.config
    del mlp.act_fn
    torch.testing.assert_close(handle.units[0].scorer.scores(x, torch.Generator().manual_seed(0)), expected)


def _padded_draws(model, handle, block: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Three training forwards of a batch whose second row ends in 6 pads, a new draw each: the
    attention mask and each draw's kept set of ``block``."""
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    kept = []
    for step in range(3):
        handle.new_step()
        model(batch(seed=step), attention_mask=mask)
        kept.append(handle.kept()[block])
    return mask, kept


def test_backward_only_scores_come_from_the_dense_forward(monkeypatch):
    """omit_in backward + activation_scores training_forward: no subsample ever goes through gate/up; each
    draw keeps the top channels of that same forward's own outputs (all real tokens, pads
    zeroed), ||h_j|| * ||W_down[:, j]||, drawn at the down projection, before any backward."""
    subsamples = []
    real = importance.mlp_hidden
    monkeypatch.setattr(importance, "mlp_hidden", lambda t, *a: subsamples.append(t.shape[0]) or real(t, *a))
    model = build("llama")
    handle = apply_sat(
        model, sat_config(metric="activation", targets=["mlp"], omit_in="backward", activation_scores="training_forward")
    )
    model.train()
    handle.set_rate(0.5)
    mlp = model.model.layers[0].mlp
    hidden = []
    hook = mlp.down_proj.register_forward_pre_hook(lambda m, a: hidden.append(a[0].detach().reshape(-1, 96)))
    mask, kept = _padded_draws(model, handle, "model.layers.0.mlp")
    hook.remove()
    assert subsamples == []
    for step in range(3):
        h = hidden[step] * mask.reshape(-1, 1)
        expected = h.norm(dim=0) * mlp.down_proj.weight.detach().norm(dim=0)
        assert torch.equal(kept[step], expected.topk(48).indices.sort().values)


def test_backward_only_attention_scores_come_from_the_dense_forwards_values(monkeypatch):
    """The same for attention's KV groups (activation_scores auto): no subsample goes through v_proj;
    each draw keeps the top groups of that forward's own values (all real tokens, pads zeroed)
    pushed through their query heads' o_proj columns, drawn at the value projection."""
    subsamples = []
    monkeypatch.setattr(importance, "activation_attention", lambda *a, **k: subsamples.append(a))
    model = build("llama")  # 8 query heads, 4 KV groups, head_dim 16
    handle = apply_sat(model, sat_config(metric="activation", targets=["attention"], omit_in="backward"))
    model.train()
    handle.set_rate(0.5)
    attn = model.model.layers[0].self_attn
    values = []
    hook = attn.v_proj.register_forward_hook(lambda m, a, out: values.append(out.detach().reshape(-1, 4, 16)))
    mask, kept = _padded_draws(model, handle, "model.layers.0.self_attn")
    hook.remove()
    assert subsamples == []
    o_weight = attn.o_proj.weight.detach()
    for step in range(3):
        v = values[step] * mask.reshape(-1, 1, 1)
        scores = torch.stack(
            [
                torch.cat([v[:, g] @ o_weight[:, h * 16 : (h + 1) * 16].t() for h in (2 * g, 2 * g + 1)], 1).norm()
                for g in range(4)
            ]
        )
        groups = scores.topk(2).indices.sort().values
        assert torch.equal(kept[step], torch.stack([2 * groups, 2 * groups + 1], 1).reshape(-1))


def test_backward_after_a_later_draw_is_refused():
    """A kept set drawn at the output projection is read in backward: if a later draw replaced it
    first (a forward after new_step), that backward cannot know its kept set and says so."""
    model = build("llama")
    handle = sparse(model, targets=["mlp"], omit_in="backward", activation_scores="training_forward")
    loss = model(batch(), labels=batch()).loss
    handle.new_step()
    model(batch(seed=2))
    with pytest.raises(SATError, match="later draw replaced"):
        loss.backward()


def test_mean_compensation_replaces_omitted_channels_by_their_mean_output():
    """compensation mean: the sparse forward equals the dense MLP with each omitted channel's
    output replaced by its mean over the scored tokens (here all of them), that constant carrying
    no gradient; every gradient matches that reference and omitted slices get none."""
    import copy

    model = build("llama", mlp_bias=True)
    reference = copy.deepcopy(model).train()
    ids = batch()
    handle = apply_sat(model, sat_config(targets=["mlp"], compensation="mean", activation_tokens=1000))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    loss = model(ids, labels=ids).loss
    loss.backward()
    hooks = []

    def mean_replaced(down, h, keep):
        mean = h.detach().reshape(-1, 96).mean(0)  # this forward's own channel outputs, all tokens
        return down.forward(h * keep) + (down.weight @ (mean * (1 - keep))).detach()

    for unit in handle.units:
        keep = torch.zeros(96)
        keep[handle.kept()[unit.name]] = 1.0
        down = reference.get_submodule(f"{unit.name}.down_proj")
        hooks.append(down.register_forward_hook(lambda m, a, out, keep=keep: mean_replaced(m, a[0], keep)))
    ref_loss = reference(ids, labels=ids).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    omitted = torch.ones(96, dtype=torch.bool)
    omitted[handle.kept()["model.layers.0.mlp"]] = False
    assert torch.count_nonzero(model.model.layers[0].mlp.down_proj.weight.grad[:, omitted]) == 0
    # without compensation the loss differs: the constant is really added
    assert abs(loss.item() - _masked_loss(model, handle, ids)) > 1e-4


def _masked_loss(model, handle, ids):
    handle.config.compensation = "none"
    for unit in handle.units:
        unit.compensation = None
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


@pytest.mark.parametrize("bad", [dict(omit_in="backward"), dict(metric="wanda")])
def test_mean_compensation_needs_a_sparse_forward_and_the_activation_metric(bad):
    with pytest.raises(SATError, match="compensation"):
        SATConfig(**{"omit_in": "forward_backward", "compensation": "mean", **bad})


def test_score_state_survives_a_checkpoint_round_trip():
    """A resumed run must draw what the uninterrupted one draws: the scores carried between draws
    (forward-measured RMS, the window position) go through the trainer state's JSON and back."""
    import json

    model = build("llama")
    handle = apply_sat(
        model, sat_config(metric="activation", targets=["mlp"], activation_scores="training_forward", remeasure_every=3)
    )
    model.train()
    handle.set_rate(0.5)
    with torch.no_grad():
        for step in range(2):
            handle.new_step()
            model(batch(seed=step))
        state = json.loads(json.dumps(handle.score_state()))
        draw = handle.draw_id
        handle.new_step()
        model(batch(seed=2))
        uninterrupted = handle.kept()
        handle.reset_draws()  # what a fresh process has
        handle.load_score_state(state)
        handle.draw_id = draw
        handle.new_step()
        model(batch(seed=2))
    assert all(torch.equal(handle.kept()[name], kept) for name, kept in uninterrupted.items())
    assert handle.units[0].scorer.window == state["model.layers.0.mlp"]["window"] + 1
