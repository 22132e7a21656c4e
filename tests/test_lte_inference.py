"""LTE's sparse inference path (sat_trainer.lte.inference): exact against the dense model with every expert active
and against a masked dense reference with the routers' selection (prefill and decode, with and without the KV cache,
batch 1 and batched), through save and load, and without changing the model's own weights."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from test_lte import NO_LOSSES, _masked_reference
from tiny import batch, build

from sat_trainer import apply_lte, load_lte
from sat_trainer.lte.inference import ExpertLayout, plain_projections

STEPS = 6


@pytest.fixture
def gathered(monkeypatch):
    """Counts the MLP calls the gathered path answered (not handed back to the masked reference), by token count."""
    calls = {"one": 0, "several": 0}
    forward = ExpertLayout.forward

    def spy(self, x, selected):
        out = forward(self, x, selected)
        if out is not None:
            calls["one" if x.reshape(-1, x.shape[-1]).shape[0] == 1 else "several"] += 1
        return out

    monkeypatch.setattr(ExpertLayout, "forward", spy)
    return calls


def _routed(family: str = "llama", silent: int = 1, **cfg):
    """A tiny model, its unrouted copy, and the routed model in stage hard, eval. The first ``silent`` experts of
    every router get a zero row: score exactly 0.5, never over the default threshold 0.5, so no call selects every
    expert and the gathered path (not the fallback) answers prefill too."""
    model = build(family)
    reference = copy.deepcopy(model)
    handle = apply_lte(model, {"expert_size": 16, **NO_LOSSES, **cfg})
    with torch.no_grad():
        for block in handle.blocks:
            block.router.weight[:silent] = 0
    handle.set_stage("hard")
    model.eval()
    reference.eval()
    return reference, model, handle


def _generate(model, ids, use_cache: bool = True):
    out = model.generate(
        ids,
        max_new_tokens=STEPS,
        do_sample=False,
        use_cache=use_cache,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
def test_layout_equals_the_masked_forward_for_any_selection(family):
    """The gathered kernel alone: biases (llama), a fused gate_up (phi3), GELU (gemma); one token and several, each
    token its own selection; no expert selected gives the down bias; every expert in the union hands back None."""
    _, model, handle = _routed(family)
    routed = handle.blocks[0]
    layout = routed.fast_layout()
    experts = routed.router.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tokens in (1, 5):
            x = torch.randn(tokens, 64, generator=generator)
            selected = torch.rand(tokens, experts, generator=generator) < 0.5
            selected[:, 0] = False  # expert 0 in no token's selection: the union is not everything
            torch.testing.assert_close(layout.forward(x, selected), routed._masked(x, selected), rtol=1e-5, atol=1e-6)
        none = torch.zeros(2, experts, dtype=torch.bool)
        torch.testing.assert_close(layout.forward(x[:2], none), routed._masked(x[:2], none), rtol=0, atol=0)
        everything = torch.zeros(3, experts, dtype=torch.bool)
        everything[torch.arange(3), torch.arange(3)] = True
        everything[0] = True
        assert layout.forward(x[:3], everything) is None


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("rows", [1, 2])
def test_generate_equals_the_masked_dense_reference(gathered, rows, use_cache):
    """Greedy generation through the fast path against an unrouted copy masked by hooks: the same tokens and the
    same logits at every step, prefill and decode, with and without the KV cache."""
    reference, model, handle = _routed()
    routers, hooks = _masked_reference(reference, handle, "hard")
    ids = batch()[:rows, :8]
    with torch.no_grad():
        tokens, scores = _generate(model, ids, use_cache)
        ref_tokens, ref_scores = _generate(reference, ids, use_cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # every MLP call was answered by the gathered path: several tokens at prefill (and each step without cache)
    calls = len(handle.blocks) * (STEPS - 1 if use_cache else 0)  # the first token comes from the prefill
    assert gathered["several"] >= len(handle.blocks) and gathered["one"] == (calls if rows == 1 else 0)
    for hook in hooks:
        hook.remove()


def test_every_expert_active_generates_the_dense_models_text_bit_for_bit(gathered):
    """Routers at zero score 0.5 everywhere, over a threshold of 0.4: every expert runs, the fast path hands each
    call to the reference (nothing to skip), which multiplies by ones: the dense model's logits exactly."""
    model = build("llama")
    reference = copy.deepcopy(model)
    handle = apply_lte(model, {"expert_size": 16, "router_init": "zeros", "threshold": 0.4, **NO_LOSSES})
    handle.set_stage("hard")
    model.eval()
    reference.eval()
    ids = batch()[:1, :8]
    with torch.no_grad():
        tokens, scores = _generate(model, ids)
        ref_tokens, ref_scores = _generate(reference, ids)
    assert torch.equal(tokens, ref_tokens) and torch.equal(scores, ref_scores)
    assert all(b.layout is not None for b in handle.blocks)  # the fast path was on, and found nothing to skip
    assert gathered == {"one": 0, "several": 0}


def test_the_fast_path_stays_off_with_autograd_on_and_in_training():
    reference, model, handle = _routed()
    ids = batch()[:1, :4]
    logits = model(ids).logits  # eval, autograd on: the masked reference, gradients reach the weights
    logits.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad is not None
    with torch.no_grad():
        model(ids)
    assert handle.blocks[0].layout is not None
    model.train()
    model(ids)
    assert all(b.layout is None for b in handle.blocks)  # training frees the buffers


def test_buffers_follow_an_in_place_change_of_the_weights(gathered):
    _, model, handle = _routed()
    ids = batch()[:1, :1]
    with torch.no_grad():
        model(ids)
        first = handle.blocks[0].layout
        model.model.layers[0].mlp.up_proj.weight.mul_(2)
        fast = model(ids).logits
        with torch.enable_grad():
            masked = model(ids).logits
    assert handle.blocks[0].layout is not first
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)
    mlp = model.model.layers[1].mlp
    mlp.down_proj = torch.nn.Linear(mlp.down_proj.in_features, mlp.down_proj.out_features)  # a replaced module
    with torch.no_grad():
        fast = model(ids).logits
        with torch.enable_grad():
            masked = model(ids).logits
    assert handle.blocks[1].layout.projections[-1] is mlp.down_proj
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-5)


def test_remove_restores_the_exact_weights_and_the_dense_model():
    reference, model, handle = _routed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        _generate(model, batch()[:1, :8])
    assert all(b.layout is not None for b in handle.blocks)
    handle.remove()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(b.layout is None for b in handle.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(batch()).logits, reference(batch()).logits, rtol=0, atol=0)


def test_save_and_load_round_trip_through_the_fast_path(tmp_path, gathered):
    _, model, handle = _routed()
    ids = batch()[:1, :8]
    with torch.no_grad():
        tokens, scores = _generate(model, ids)
    model.save_pretrained(tmp_path)
    handle.save(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items())  # the model's own layout
    loaded = load_lte(plain, tmp_path)
    assert all(b.layout is not None for b in loaded.blocks)  # laid out at load
    assert loaded.prepare_inference() == len(loaded.blocks)
    used = dict(gathered)
    with torch.no_grad():
        plain_tokens, plain_scores = _generate(plain, ids)
    # the same tokens; logits to float rounding (a reloaded model's generate differs at 1e-7 even without LTE)
    assert torch.equal(plain_tokens, tokens)
    torch.testing.assert_close(plain_scores, scores, rtol=1e-5, atol=1e-6)
    assert gathered["one"] > used["one"]


def test_a_lora_wrapped_mlp_keeps_the_masked_path():
    peft = pytest.importorskip("peft")
    model = build("llama")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["up_proj"]))
    handle = apply_lte(model, {"expert_size": 16})
    block = handle.blocks[0]
    assert plain_projections(block.block, block.shape) is None and block.fast_layout() is None
