"""The scoring subsample's full-width gate/up outputs reused by the sliced forward (issue 15): the
``activation`` metric computes every channel on a token subsample to draw the kept set, and the
forward of that micro-batch then computes only the other rows. Exact against the masked dense
reference; every other call goes through the same op with nothing given."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from reference import loss_and_grads, masked
from test_exactness import _assert_matches_masked_reference
from tiny import batch, build, sparse

from sat_trainer import apply_sat, importance, ops, remove_sat

SMALL_SUBSAMPLE = dict(metric="activation", activation_tokens=6, activation_token_fraction=0.1)  # 6 of 32 tokens


@pytest.fixture
def given_calls(monkeypatch):
    """(rows given or None, rows computed) of every call of the given-rows forward."""
    calls = []
    real = ops._linear_given_rows

    def spy(x, w, b, rows=None, other=None, values=None):
        tokens = x.numel() // x.shape[-1]
        given = None if values is None else (tokens if rows is None else rows.numel())
        calls.append((given, tokens - (given or 0)))
        return real(x, w, b, rows, other, values)

    monkeypatch.setattr(ops, "_linear_given_rows", spy)
    return calls


@pytest.fixture(params=["device default", "kept op"])
def op_path(request, monkeypatch):
    if request.param == "kept op":
        monkeypatch.setattr(ops, "KEPT_OP_DEVICES", ("cpu", "cuda"))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])  # separate gate/up, fused gate_up, Conv1D without a gate
@pytest.mark.parametrize("subsample", [SMALL_SUBSAMPLE, dict(metric="activation")], ids=["6 of 32 tokens", "all tokens"])
def test_subsample_rows_are_reused_and_the_step_is_exact(op_path, given_calls, family, subsample):
    model = build(family)
    handle = _assert_matches_masked_reference(model, **subsample)
    mlps = [u for u in handle.units if u.kind == "mlp"]
    inputs_per_block = sum(len(u.inputs) for u in mlps) // len(mlps)
    given = [c for c in given_calls if c[0] is not None]
    # each MLP input projection took the subsample's rows once and computed only the others
    sampled = 6 if subsample is SMALL_SUBSAMPLE else 32
    assert given == [(sampled, 32 - sampled)] * (len(mlps) * inputs_per_block)
    assert all(u.scorer.sample_outputs is None for u in mlps)  # nothing held past the forward
    remove_sat(model)


def test_padding_rows_in_the_subsample_get_the_forwards_own_outputs(given_calls):
    """A batch with more padding than real tokens: the subsample draws every real token and some
    padding rows; scoring does not zero those rows' inputs (they weigh 0 in the statistics), so
    their reused outputs are the forward's own and the step is exactly the masked reference's."""
    model = build("llama")
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], metric="activation", activation_tokens=20, activation_token_fraction=0.1)
    ids = batch()
    mask = torch.zeros_like(ids)
    mask[:, :6] = 1  # 12 real tokens of 32
    results = []
    for net in (model, reference):
        net.zero_grad(set_to_none=True)
        with masked(reference, handle) if net is reference else contextlib.nullcontext():
            out = net(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
            out.loss.backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.logits.detach(), grads))
    assert [c for c in given_calls if c[0] is not None] == [(20, 12)] * 4
    (loss, logits, grads), (ref_loss, ref_logits, ref_grads) = results
    # the padding positions' logits too: only they read the padding rows' MLP outputs
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_later_micro_batch_computes_every_row(given_calls):
    """One draw serves the step's micro-batches; only the one it measured has rows to reuse."""
    model = build("llama")
    handle = sparse(model, targets=["mlp"], **SMALL_SUBSAMPLE)
    model(batch(seed=1), labels=batch(seed=1)).loss.backward()
    first = list(given_calls)
    given_calls.clear()
    kept = {n: k.clone() for n, k in handle.kept().items()}
    model(batch(seed=2), labels=batch(seed=2)).loss.backward()
    assert first == [(6, 26)] * 4
    assert given_calls == [(None, 32)] * 4  # the same op, nothing given
    assert all(torch.equal(kept[n], k) for n, k in handle.kept().items())


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_without_the_rows_matches_the_forward(op_path, reentrant):
    """Under gradient checkpointing the recompute has no given rows (its input is a new tensor):
    it computes every row through the same op, so a non-reentrant checkpoint finds the tensors its
    forward saved, and the step equals the unchecked one."""
    base = build("llama")
    checkpointed = copy.deepcopy(base)
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    results = []
    for model in (base, checkpointed):
        handle = sparse(model, **SMALL_SUBSAMPLE)
        loss, _, grads = loss_and_grads(model, batch())
        results.append((loss, grads, handle.kept()))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = results
    assert all(torch.equal(kept_a[n], kept_b[n]) for n in kept_a)
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_other_rows_are_the_complement_in_order():
    rows = torch.tensor([7, 0, 3])
    assert importance.other_rows(rows, 8).tolist() == [1, 2, 4, 5, 6]


def test_modes_that_do_not_score_a_subsample_reuse_nothing(given_calls):
    model = build("llama")
    for cfg in (
        dict(metric="wanda"),
        dict(metric="activation", omit_in="backward"),
        dict(metric="activation", activation_scores="training_forward"),
    ):
        handle = apply_sat(model, dict(targets=["mlp"], omission_rate=0.5, **cfg))
        model.train()
        handle.set_rate(0.5)
        handle.new_step()
        assert not any(u.scorer.reuses_sample for u in handle.units)
        model(batch(), labels=batch()).loss.backward()
        remove_sat(model)
    assert given_calls == []
