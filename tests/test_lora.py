"""SAT with PEFT LoRA: exact against the masked dense LoRA model, in outputs and adapter
gradients, for any subset of targeted projections, merged/disabled/multiple adapters, either
order of apply_sat and get_peft_model, and with gradient checkpointing. DoRA is refused."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from reference import loss_and_grads, masked
from tiny import batch, build, sat_config, sparse

from sat_trainer import SATError, apply_sat

ALL = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
SUBSETS = [ALL, ["gate_proj", "down_proj"], ["up_proj", "q_proj", "v_proj"], ["o_proj", "k_proj"]]


def _lora(model, targets=ALL, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False, **kwargs)
    return peft.get_peft_model(model, config)


def _assert_exact(model, reference, handle, ids):
    loss, logits, grads = loss_and_grads(model, ids)
    reference.train()
    with masked(reference, handle):
        ref_loss, ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    return grads


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward", "weight_gradient"])
@pytest.mark.parametrize("targets", SUBSETS, ids=["all", "gate-down", "up-q-v", "o-k"])
def test_lora_exact_against_masked_dense(targets, omit_in):
    model = _lora(build("llama"), targets)
    reference = copy.deepcopy(model)
    handle = sparse(model, omit_in=omit_in)
    grads = _assert_exact(model, reference, handle, batch())
    # omitted channels: their lora_B rows (input side) / lora_A columns (output side) get zero gradient
    unit = next(u for u in handle.units if u.kind == "mlp")
    omitted = torch.ones(96, dtype=torch.bool)
    omitted[handle.kept()[unit.name]] = False
    if "gate_proj" in targets:
        assert torch.count_nonzero(grads["base_model.model.model.layers.0.mlp.gate_proj.lora_B.default.weight"][omitted]) == 0
    if "down_proj" in targets:
        assert torch.count_nonzero(grads["base_model.model.model.layers.0.mlp.down_proj.lora_A.default.weight"][:, omitted]) == 0


@pytest.mark.parametrize(
    "family,targets", [("llama", SUBSETS[0]), ("phi3", ["gate_up_proj", "down_proj"])], ids=["llama", "phi3"]
)
def test_lora_under_a_dense_forward_drawn_at_the_output_is_exact(family, targets):
    """omit_in backward with activation_scores training_forward: the kept set is drawn at the base down
    projection (before its lora_A runs); lora_B rows of gate/up read it in backward."""
    model = _lora(build(family), targets)
    reference = copy.deepcopy(model)
    handle = sparse(model, targets=["mlp"], omit_in="backward", activation_scores="training_forward")
    grads = _assert_exact(model, reference, handle, batch())
    unit = handle.units[0]
    omitted = torch.ones(96, dtype=torch.bool)
    omitted[handle.kept()[unit.name]] = False
    lora_b = grads[f"base_model.model.model.layers.0.mlp.{targets[0]}.lora_B.default.weight"]
    assert torch.count_nonzero(lora_b[:96][omitted]) == 0 and torch.count_nonzero(lora_b[:96][~omitted]) > 0


def test_get_peft_model_after_apply_sat_matches_the_other_order():
    first = build("llama")
    second = copy.deepcopy(first)
    handle_a = apply_sat(first, sat_config(omission_rate=0.5))
    peft_a = _lora(first)
    torch.manual_seed(0)
    peft_b = _lora(second)
    peft_b.load_state_dict(peft_a.state_dict())
    handle_b = apply_sat(peft_b, sat_config(omission_rate=0.5))
    results = []
    for model, handle in ((peft_a, handle_a), (peft_b, handle_b)):
        model.train()
        handle.set_rate(0.5)
        handle.new_step()
        results.append(loss_and_grads(model, batch()))
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    reference = _lora(build("llama"))
    reference.load_state_dict(peft_a.state_dict())
    _assert_exact(peft_a, reference, handle_a, batch())


def test_merged_disabled_and_multiple_adapters():
    model = _lora(build("llama"))
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["gate_proj", "o_proj"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "other"])
    reference = copy.deepcopy(model)
    reference.base_model.set_adapter(["default", "other"])
    handle = sparse(model)
    ids = batch()
    _assert_exact(model, reference, handle, ids)

    with model.disable_adapter(), reference.disable_adapter(), torch.no_grad(), masked(reference, handle):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)

    model.base_model.set_adapter("default")
    reference.base_model.set_adapter("default")
    model.merge_adapter()
    reference.merge_adapter()
    with torch.no_grad(), masked(reference, handle):
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
def test_gradient_checkpointing_with_lora_gives_same_loss_and_grads(omit_in):
    base = _lora(build("llama"))
    checkpointed = copy.deepcopy(base)
    checkpointed.enable_input_require_grads()
    checkpointed.base_model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for model in (base, checkpointed):
        sparse(model, metric="wanda", omit_in=omit_in)
        results.append(loss_and_grads(model, batch()))
    torch.testing.assert_close(results[0][0], results[1][0], atol=0, rtol=0)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(grad, results[1][2][name], atol=1e-6, rtol=1e-5, msg=name)


def test_dora_is_refused_by_name():
    model = _lora(build("llama"), ["down_proj"], use_dora=True)
    with pytest.raises(SATError, match=r"model\.layers\.0\.mlp\.down_proj: .*DoRA.*use_dora=False"):
        apply_sat(model)


def test_dora_added_after_apply_sat_fails_at_the_next_forward():
    model = build("llama")
    apply_sat(model, sat_config(omission_rate=0.5))
    model = _lora(model, ["down_proj"], use_dora=True)
    with pytest.raises(SATError, match="DoRA"):
        model(batch())


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
def test_lora_with_context_tokens_sparse_is_exact(omit_in):
    """sparse_tokens context under LoRA: base rows and lora_B rows / lora_A columns follow the
    split (under backward in backward only, the shipped SFT recipe's path), against the reference
    masked on the context rows only."""
    model = _lora(build("llama"), ["gate_proj", "up_proj", "down_proj"])
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], sparse_tokens="context", omit_in=omit_in)
    ids = batch()
    labels = ids.clone()
    labels[:, :10] = -100
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    assert handle.token_split[0].numel() == 2 * 7  # positions 9..15 of each row
    with masked(reference, handle):
        ref = reference(ids, labels=labels)
        ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward", "weight_gradient"])
def test_lora_on_phi3_fused_gate_up_projection_is_exact(omit_in):
    """Phi-3's gate_up_proj under LoRA: the base rows and lora_B rows of each kept channel in
    both halves ([gate | up]) are kept together; omitted channels' lora_B rows get no gradient."""
    model = _lora(build("phi3"), ["gate_up_proj", "down_proj", "qkv_proj", "o_proj"])
    reference = copy.deepcopy(model)
    handle = sparse(model, targets=["mlp"], omit_in=omit_in)
    grads = _assert_exact(model, reference, handle, batch())
    unit = handle.units[0]
    omitted = torch.ones(96, dtype=torch.bool)
    omitted[handle.kept()[unit.name]] = False
    lora_b = grads["base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.default.weight"]
    assert lora_b.shape[0] == 2 * 96
    for half in (lora_b[:96], lora_b[96:]):  # gate rows, then up rows
        assert torch.count_nonzero(half[omitted]) == 0 and torch.count_nonzero(half[~omitted]) > 0


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward", "weight_gradient"])
def test_lora_on_phi3_fused_qkv_projection_is_exact(omit_in):
    """Phi-3's qkv_proj under LoRA: the base rows and lora_B rows of each kept KV group in each of
    the three unequal segments ([q | k | v]: 8, 4, 4 heads of head_dim 16) are kept together;
    omitted groups' lora_B rows get no gradient in any segment."""
    model = _lora(build("phi3"), ["gate_up_proj", "down_proj", "qkv_proj", "o_proj"])
    reference = copy.deepcopy(model)
    handle = sparse(model, omit_in=omit_in)
    grads = _assert_exact(model, reference, handle, batch())
    name = "base_model.model.model.layers.0.self_attn"
    omitted = torch.ones(4, dtype=torch.bool)
    omitted[handle.kept()[name].div(2, rounding_mode="floor")] = False  # query heads -> their KV groups
    assert int(omitted.sum()) == 2
    lora_b = grads[f"{name}.qkv_proj.lora_B.default.weight"]
    assert lora_b.shape[0] == (8 + 4 + 4) * 16
    q, k, v = lora_b[:128].reshape(4, 32, -1), lora_b[128:192].reshape(4, 16, -1), lora_b[192:].reshape(4, 16, -1)
    for segment in (q, k, v):
        assert torch.count_nonzero(segment[omitted]) == 0 and torch.count_nonzero(segment[~omitted]) > 0
