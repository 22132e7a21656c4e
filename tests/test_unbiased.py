"""selection unbiased (omit_in backward): kept units' backward scaled by 1/p, exact against the
scaled reference, and unbiased: on average over draws the gradient is the dense one."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import loss_and_grads, masked
from tiny import batch, build, sparse

from sat_trainer import SATConfig, SATError, remove_sat, selection


def test_top_share_is_kept_for_sure_and_the_rest_is_uniform_with_inverse_probability_scales():
    scores = torch.arange(24.0)  # unit 23 scores highest
    counts = torch.zeros(24)
    weighted = torch.zeros(24)
    draws = 4000
    for d in range(draws):
        kept, scale = selection.unbiased(scores, 12, 0.5, selection.generator_for(0, d, 0), groups=2)
        assert kept.tolist() == sorted(kept.tolist()) and kept.numel() == 12
        assert ((kept < 12).sum(), (kept >= 12).sum()) == (6, 6)  # k/groups in each group
        assert {9, 10, 11, 21, 22, 23} <= set(kept.tolist())  # per group the top 3 (half of 6)
        counts[kept] += 1
        weighted[kept] += scale
    top = torch.tensor([9, 10, 11, 21, 22, 23])
    assert (counts[top] == draws).all()
    rest = torch.ones(24, dtype=torch.bool)
    rest[top] = False
    # the others: drawn with p = 3/9, scaled by 3; every unit's expected scale is 1
    torch.testing.assert_close(counts[rest] / draws, torch.full((18,), 1 / 3), atol=0.03, rtol=0)
    torch.testing.assert_close(weighted / draws, torch.ones(24), atol=0.08, rtol=0)


def test_fraction_one_is_topk_and_zero_is_uniform():
    scores = torch.rand(16, generator=torch.Generator().manual_seed(3))
    g = selection.generator_for(0, 0, 0)
    kept, scale = selection.unbiased(scores, 4, 1.0, g)
    assert torch.equal(kept, selection.topk(scores, 4)) and torch.equal(scale, torch.ones(4))
    kept, scale = selection.unbiased(scores, 4, 0.0, g)
    assert torch.equal(scale, torch.full((4,), 4.0))


CASES = [("llama", ["mlp", "attention"]), ("gpt2", ["mlp", "attention"]), ("phi3", ["mlp", "attention"])]


@pytest.mark.parametrize("family,targets", CASES, ids=[c[0] for c in CASES])
def test_scaled_backward_matches_the_scaled_reference(family, targets):
    """Dense logits; every gradient equals the reference whose kept units' backward paths are
    scaled by their 1/p (and omitted ones cut); the plain cut reference differs."""
    model = build(family)
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=targets, metric="activation", omit_in="backward", selection="unbiased")
    ids = batch()
    loss, logits, grads = loss_and_grads(model, ids)
    with masked(reference, handle):
        ref_loss, ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all(u.kept_scale is not None and u.kept_scale.max() > 1 for u in handle.units)
    scales = [u.kept_scale for u in handle.units]
    for u in handle.units:
        u.kept_scale = None  # the reference now cuts without scaling
    with masked(reference, handle):
        _, _, cut_grads = loss_and_grads(reference, ids)
    for u, s in zip(handle.units, scales):
        u.kept_scale = s
    assert any(not torch.allclose(grads[n], cut_grads[n], atol=1e-4) for n in grads)
    remove_sat(model)


def test_context_split_scales_the_sparse_rows_only():
    model = build("llama")
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], omit_in="backward", selection="unbiased", sparse_tokens="context")
    ids = batch()
    labels = ids.clone()
    labels[:, :8] = -100
    model.zero_grad(set_to_none=True)
    model(ids, labels=labels).loss.backward()
    with masked(reference, handle):
        reference(ids, labels=labels).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    remove_sat(model)


def test_mean_gradient_over_draws_approaches_dense_where_topk_stays_biased():
    """The point of the option: averaged over draws the gradient is dense's; topk's is not."""
    model = build("llama")
    ids = batch()
    _, _, dense = loss_and_grads(copy.deepcopy(model).train(), ids)

    def mean_error(select: str, draws: int) -> float:
        m = copy.deepcopy(model)
        handle = sparse(m, targets=["mlp"], metric="activation", omit_in="backward", selection=select, topk_fraction=0.25)
        total = None
        for _ in range(draws):
            _, _, g = loss_and_grads(m, ids)
            total = g if total is None else {n: total[n] + g[n] for n in g}
            handle.new_step()
        num = sum(((total[n] / draws) - dense[n]).square().sum() for n in dense)
        return float((num / sum(dense[n].square().sum() for n in dense)).sqrt())

    topk_error, unbiased_error = mean_error("topk", 1), mean_error("unbiased", 300)
    assert unbiased_error < 0.5 * topk_error, (unbiased_error, topk_error)


def test_unbiased_needs_a_dense_forward_and_a_fraction_in_range():
    with pytest.raises(SATError, match="omit_in backward"):
        SATConfig(selection="unbiased")
    with pytest.raises(SATError, match="topk_fraction"):
        SATConfig(selection="unbiased", omit_in="backward", topk_fraction=1.5)
