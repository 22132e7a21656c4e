"""omit_in backward: the attention core runs its backward for the kept KV groups' heads only
(sat_trainer.patch.attention_core); the gradients stay the masked reference's (test_exactness's
sdpa cases), this file checks that the split happens, and only where it may."""

from __future__ import annotations

import pytest
import torch
from reference import loss_and_grads
from tiny import batch, build, eager_and_compiled_steps, sat_config, sparse
from transformers.modeling_utils import AttentionInterface

from sat_trainer import remove_sat
from sat_trainer.patch import attention_core


@pytest.fixture
def core_calls(monkeypatch):
    """(query heads, grad enabled, saved for backward) of every call of the wrapped sdpa's inner function."""
    calls = []
    attention_core._install()
    wrapper = AttentionInterface._global_mapping["sdpa"]
    inner = wrapper.__wrapped__

    def spy(module, query, *args, **kwargs):
        out = inner(module, query, *args, **kwargs)
        calls.append((query.shape[1], torch.is_grad_enabled(), out[0].requires_grad))
        return out

    monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", attention_core._splitting(spy))
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_backward_only_splits_the_core_into_kept_and_omitted_heads(family, core_calls):
    """8 query heads in 4 KV groups, half omitted: per block one call on the 4 kept query heads
    with autograd and one on the 4 omitted under no_grad (nothing saved for their backward);
    the omitted heads' outputs are still the dense forward's (the logits are the unpatched model's)."""
    model = build(family, "sdpa")
    dense_logits = build(family, "sdpa").train()(batch()).logits.detach()
    core_calls.clear()
    handle = sparse(model, targets=["mlp", "attention"], omit_in="backward")
    _, logits, _ = loss_and_grads(model, batch())
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    blocks = [u for u in handle.units if u.kind == "attention"]
    assert len(blocks) == 2 and all(u.k() == 2 and u.n == 4 for u in blocks)
    assert sorted(core_calls) == sorted([(4, False, False), (4, True, True)] * len(blocks))
    remove_sat(model)
    core_calls.clear()
    loss_and_grads(model.train(), batch())
    assert core_calls == [(8, True, True)] * len(blocks)  # unpatched: one call on every head


@pytest.mark.parametrize(
    "cfg",
    [
        dict(omit_in="forward_backward"),  # the sliced forward already computes only the kept heads
        dict(omit_in="weight_gradient"),  # the input gradient is the dense one: every head's core backward is needed
        dict(omit_in="backward", attention_unit="query_head"),  # K and V are whole: every KV head is read by kept heads
        dict(omit_in="backward", targets=["mlp"]),  # attention not omitted
    ],
)
def test_the_core_runs_whole_where_it_must(cfg, core_calls):
    model = build("llama", "sdpa")
    sparse(model, **{"targets": ["mlp", "attention"], **cfg})
    loss_and_grads(model, batch())
    heads = 4 if cfg.get("omit_in") == "forward_backward" else 8  # forward_backward: the kept heads, one call
    assert core_calls == [(heads, True, True)] * 2, cfg
    remove_sat(model)


def test_eval_and_no_grad_run_the_core_whole(core_calls):
    model = build("llama", "sdpa")
    sparse(model, targets=["mlp", "attention"], omit_in="backward")
    with torch.no_grad():
        model(batch())
    model.eval()(batch())
    assert [h for h, _, _ in core_calls] == [8] * 4


@pytest.mark.slow
def test_compiled_split_matches_eager():
    """Under torch.compile the split's kept heads are read outside the graph: the loss and every
    gradient are eager's, draw after draw (the kept KV groups change between draws)."""
    config = sat_config(omission_rate=0.5, omit_in="backward", targets=["mlp", "attention"], metric="uniform")
    runs = eager_and_compiled_steps(build("llama", "sdpa"), config, 0.5)
    for (loss_e, grads_e, kept_e), (loss_c, grads_c, kept_c) in zip(*runs):
        torch.testing.assert_close(loss_c, loss_e, atol=0, rtol=0)
        assert all(torch.equal(kept_c[n], kept_e[n]) for n in kept_e)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-5, msg=name)
    attention = [n for n in runs[0][0][2] if "self_attn" in n]
    assert attention and any(not torch.equal(runs[0][0][2][n], runs[0][2][2][n]) for n in attention)
