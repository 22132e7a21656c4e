"""Invariants 2, 3, 5 and 7: free dense paths, one draw per step through checkpoint recompute,
plain state dicts, clear errors for what SAT cannot do."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from reference import loss_and_grads
from tiny import batch, build, sat_config

from sat_trainer import SATError, apply_sat, remove_sat
from sat_trainer.patch.model import handle_of


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "phi3"])
def test_rate_zero_eval_and_remove_are_bit_identical(family):
    model = build(family)
    plain = copy.deepcopy(model)
    ids = batch()
    plain.train()
    expected_train = _logits(plain, ids)
    plain.eval()
    expected_eval = _logits(plain, ids)

    handle = apply_sat(model, sat_config(omission_rate=0.5))
    model.train()
    assert torch.equal(_logits(model, ids), expected_train)  # rate 0 (the handle's start)
    handle.set_rate(0.5)
    handle.new_step()
    assert not torch.equal(_logits(model, ids), expected_train)  # sparse while training
    model.eval()
    assert torch.equal(_logits(model, ids), expected_eval)  # eval runs dense
    remove_sat(model)
    model.train()
    assert torch.equal(_logits(model, ids), expected_train)
    assert handle_of(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_handle_remove_restores_the_model_and_allows_patching_again():
    model = build("llama")
    ids = batch()
    model.train()
    expected = _logits(model, ids)
    handle = apply_sat(model, sat_config(omission_rate=0.5))
    handle.set_rate(0.5)
    handle.new_step()
    assert not torch.equal(_logits(model, ids), expected)
    handle.remove()
    assert handle_of(model) is None
    assert torch.equal(_logits(model, ids), expected)
    again = apply_sat(model, sat_config(omission_rate=0.5))  # not "already patched"
    assert handle_of(model) is again
    remove_sat(model)
    assert torch.equal(_logits(model, ids), expected)


def test_no_parameters_or_buffers_added():
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_sat(model, sat_config())
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    model(batch())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_one_draw_per_step_and_redraw_on_new_step():
    model = build("llama")
    handle = apply_sat(model, sat_config(omission_rate=0.5, metric="uniform"))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    model(batch(seed=1))
    first = {n: k.clone() for n, k in handle.kept().items()}
    model(batch(seed=2))  # another micro-batch of the same step: same kept set
    assert all(torch.equal(first[n], k) for n, k in handle.kept().items())
    handle.new_step()
    model(batch(seed=1))
    assert any(not torch.equal(first[n], k) for n, k in handle.kept().items())


def test_set_rate_changes_k_at_next_forward():
    model = build("llama")
    handle = apply_sat(model, sat_config(targets=["mlp"]))
    model.train()
    handle.set_rate(0.5)
    model(batch())
    assert {k.numel() for k in handle.kept().values()} == {48}
    handle.set_rate(0.25)
    model(batch())
    assert {k.numel() for k in handle.kept().values()} == {72}
    with pytest.raises(SATError, match=r"\[0, 1\)"):
        handle.set_rate(1.0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "metric,reentrant,omit_in,family,scores",
    [
        ("wanda", False, "forward_backward", "llama", "subsample"),
        ("uniform", False, "forward_backward", "llama", "subsample"),
        ("wanda", True, "forward_backward", "llama", "subsample"),
        ("activation", False, "backward", "llama", "subsample"),
        ("activation", True, "backward", "llama", "subsample"),
        ("activation", True, "forward_backward", "phi3", "subsample"),
        ("activation", False, "backward", "llama", "training_forward"),
        ("activation", True, "backward", "phi3", "training_forward"),
    ],
)
def test_gradient_checkpointing_reuses_the_kept_set(metric, reentrant, omit_in, family, scores):
    base = build(family)
    checkpointed = copy.deepcopy(base)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    results, calls = [], []
    for model in (base, checkpointed):
        handle = apply_sat(
            model, sat_config(omission_rate=0.5, metric=metric, selection="sampling", omit_in=omit_in, activation_scores=scores)
        )
        model.train()
        handle.set_rate(0.5)
        handle.new_step()
        draws, index_calls = [], []
        for unit in handle.units:
            index_calls_of = unit.input_index
            unit.input_index = lambda *a, f=index_calls_of, c=index_calls: (c.append(1), f(*a))[1]
            original = unit._draw
            unit._draw = lambda x, key, hidden=False, u=unit, f=original: (draws.append(u.name), f(x, key, hidden))[1]
        loss, _, grads = loss_and_grads(model, batch())
        results.append((loss, grads, {n: k.clone() for n, k in handle.kept().items()}, draws))
        calls.append(len(index_calls))
    assert calls[1] == 2 * calls[0]  # the checkpointed model really recomputed every projection
    (loss_a, grads_a, kept_a, draws_a), (loss_b, grads_b, kept_b, draws_b) = results
    assert sorted(draws_a) == sorted(draws_b) == sorted(u for u in kept_a)  # recompute drew nothing
    assert all(torch.equal(kept_a[n], kept_b[n]) for n in kept_a)
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
def test_fused_qkv_head_counts_change_on_the_block_only(omit_in):
    """Phi-3 splits qkv_proj by ``config.num_attention_heads`` and ``num_key_value_heads``: while its
    forward is sliced the block reads the kept counts, from its own shallow copy of the config; the
    model's shared config is never written, and rate 0, eval and remove_sat give the block its own
    objects back. A dense forward (omit_in backward) never changes them."""
    model = build("phi3")
    shared = model.config
    before = shared.to_dict()
    handle = apply_sat(model, sat_config(omit_in=omit_in))
    blocks = [u.block for u in handle.units if u.kind == "attention"]
    assert len(blocks) == 2

    def own_counts() -> bool:
        return all(b.config is shared and b.num_key_value_heads == 4 for b in blocks)

    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    loss_and_grads(model, batch())
    if omit_in == "forward_backward":
        for block in blocks:  # 2 of 4 KV groups kept, 2 query heads each
            assert block.config is not shared and (block.config.num_attention_heads, block.num_key_value_heads) == (4, 2)
            assert block.config._attn_implementation == shared._attn_implementation
    else:
        assert own_counts()
    assert model.config is shared and shared.num_attention_heads == 8 and shared.to_dict() == before
    handle.set_rate(0.0)
    _logits(model, batch())
    assert own_counts()
    handle.set_rate(0.5)
    _logits(model, batch())
    model.eval()
    _logits(model, batch())
    assert own_counts()
    model.train()
    _logits(model, batch())
    remove_sat(model)
    assert own_counts() and shared.num_attention_heads == 8 and shared.to_dict() == before


@pytest.mark.parametrize("attention_unit", ["kv_group", "query_head"])
def test_fused_qkv_unit_gradients_and_omitted_rows_follow_its_segments(attention_unit):
    """Phi-3's qkv_proj rows [q | k | v] (8, 4, 4 heads of head_dim 16): a KV group owns 32 q rows,
    16 k and 16 v rows (a query head: its 16 q rows; k and v belong to no unit), which is what
    layer_rates' gradient costs (unit_gradient_square) and omitted_update (omitted_parameters) read."""
    model = build("phi3")
    handle = apply_sat(model, sat_config(attention_unit=attention_unit))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    loss_and_grads(model, batch())
    unit = next(u for u in handle.units if u.kind == "attention")
    rows = unit.block.qkv_proj.weight.grad.square().sum(1)
    columns = unit.block.o_proj.weight.grad.square().sum(0)
    if attention_unit == "kv_group":
        owned = [
            [*range(32 * g, 32 * g + 32), *range(128 + 16 * g, 144 + 16 * g), *range(192 + 16 * g, 208 + 16 * g)]
            for g in range(4)
        ]
        per_column = 32
    else:
        owned = [list(range(16 * h, 16 * h + 16)) for h in range(8)]
        per_column = 16
    expected = torch.stack([rows[o].sum() + columns[per_column * u : per_column * (u + 1)].sum() for u, o in enumerate(owned)])
    torch.testing.assert_close(unit.unit_gradient_square(), expected)
    (weight, dim, omitted), _ = unit.omitted_parameters()
    assert weight is unit.block.qkv_proj.weight and dim == 0
    kept_units = set(unit.kept_units.tolist())
    assert sorted(omitted.tolist()) == sorted(r for u, o in enumerate(owned) if u not in kept_units for r in o)


def test_unsupported_model_type_names_it_and_the_supported_list():
    config = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(SATError, match=r"model_type 'gpt_neox'.*supported: .*gemma.*llama.*phi3.*qwen3"):
        apply_sat(model)


def test_attention_target_on_gpt2_logs_dense_once(caplog):
    with caplog.at_level(logging.WARNING, logger="sat_trainer"):
        handle = apply_sat(build("gpt2"), sat_config())
    assert {u.kind for u in handle.units} == {"mlp"}
    lines = [r.getMessage() for r in caplog.records if "attention" in r.getMessage()]
    assert len(lines) == 1 and "gpt2" in lines[0] and "c_attn" in lines[0]


def test_odd_module_falls_back_dense_with_its_name(caplog):
    class Quantised(torch.nn.Linear):
        pass

    model = build("llama")
    odd = model.model.layers[1].mlp
    odd.up_proj = Quantised(64, 96)
    with caplog.at_level(logging.WARNING, logger="sat_trainer"):
        handle = apply_sat(model, sat_config(targets=["mlp"]))
    assert [u.name for u in handle.units] == ["model.layers.0.mlp"]
    assert any("model.layers.1.mlp" in r.getMessage() and "Quantised" in r.getMessage() for r in caplog.records)


def test_patching_twice_is_an_error():
    model = build("llama")
    apply_sat(model)
    with pytest.raises(SATError, match="already patched"):
        apply_sat(model)
    remove_sat(model)
    apply_sat(model)


def test_kept_flops_fraction_matches_hand_count():
    model = build("llama", num_hidden_layers=1)
    handle = apply_sat(model, sat_config(targets=["mlp"]))
    handle.set_rate(0.5)
    # linear weights: q 64x128, k 64x64, v 64x64, o 128x64, gate/up/down 3 x 64x96, lm_head 96x64
    dense = 64 * 128 + 64 * 64 * 2 + 128 * 64 + 3 * 64 * 96 + 96 * 64
    handle.seq_len = 16
    core = 2 * 16 * 8 * 16  # QK^T and AV: seq x heads x head_dim, one layer
    expected = (dense + core - 0.5 * 3 * 64 * 96) / (dense + core)
    assert handle.kept_flops_fraction() == pytest.approx(expected)
    handle.config.omit_in = "backward"  # a dense forward and a backward (2x the forward's FLOPs) at that ratio
    assert handle.kept_flops_fraction() == pytest.approx((1 + 2 * expected) / 3)
    handle.config.omit_in = "weight_gradient"  # a dense forward and input gradient; the weight gradient at that ratio
    assert handle.kept_flops_fraction() == pytest.approx((2 + expected) / 3)
    handle.config.omit_in = "forward_backward"
    handle.token_split = (torch.arange(4), torch.arange(4, 16))  # sparse_tokens context: 12 of 16 tokens omit
    assert handle.kept_flops_fraction() == pytest.approx((dense + core - 0.75 * 0.5 * 3 * 64 * 96) / (dense + core))
