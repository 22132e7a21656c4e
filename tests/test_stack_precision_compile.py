"""bf16 (autocast and bf16 weights) and torch.compile under SAT."""

from __future__ import annotations

import pytest
import torch
from reference import loss_and_grads
from tiny import batch, build, eager_and_compiled_steps, sat_config, sparse

from sat_trainer import apply_sat
from sat_trainer.schedule import omission_rate_at

pytestmark = pytest.mark.slow  # minutes on a CPU: pytest -m "not slow" leaves it out


@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
def test_bf16_autocast_step_is_close_to_fp32_for_the_same_kept_set(omit_in):
    """Tolerance: gradient cosine similarity > 0.999 and relative L2 error < 3% per tensor (bf16
    keeps 8 mantissa bits, ~0.4% per element; a two-layer model's backward compounds that)."""
    fp32 = build("llama")
    handle = sparse(fp32, metric="magnitude", selection="topk", omit_in=omit_in)  # weights-only: same set under autocast
    loss32, _, grads32 = loss_and_grads(fp32, batch())
    kept32 = {n: k.clone() for n, k in handle.kept().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _, grads16 = loss_and_grads(fp32, batch())
    assert all(torch.equal(kept32[n], k) for n, k in handle.kept().items())
    assert torch.isfinite(loss16) and abs(loss16.item() - loss32.item()) / loss32.item() < 0.01
    for name, g32 in grads32.items():
        g16 = grads16[name].float()
        assert torch.isfinite(g16).all(), name
        assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.999, name
        assert (g16 - g32).norm() / g32.norm() < 0.03, name


def test_bf16_weights_train_with_finite_loss_and_grads():
    model = build("llama").to(torch.bfloat16)
    sparse(model)
    loss, _, grads = loss_and_grads(model, batch())
    assert next(model.parameters()).dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_compiled_dense_forward_draws_at_the_output_as_eager_does():
    """omit_in backward + activation_scores training_forward under torch.compile: the MLP's kept set, drawn
    at the down projection (outside the graph) and read in backward, is eager's, and so are the
    loss and every gradient, draw after draw."""
    config = sat_config(omission_rate=0.5, omit_in="backward", activation_scores="training_forward", targets=["mlp"])
    runs = eager_and_compiled_steps(build("llama"), config, 0.5)
    for (loss_e, grads_e, kept_e), (loss_c, grads_c, kept_c) in zip(*runs):
        torch.testing.assert_close(loss_c, loss_e, atol=0, rtol=0)
        assert all(torch.equal(kept_c[n], kept_e[n]) for n in kept_e)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.equal(runs[0][0][2][n], runs[0][2][2][n]) for n in runs[0][0][2])  # the kept sets moved


@pytest.mark.parametrize(
    "omit_in,scores", [("forward_backward", "subsample"), ("backward", "subsample"), ("backward", "training_forward")]
)
def test_compile_recompiles_only_when_k_changes(omit_in, scores):
    torch._dynamo.reset()  # an earlier case's graphs would serve this one's first step (the same code, traced alike)
    model = build("llama")
    handle = apply_sat(
        model,
        sat_config(omission_rate=0.5, ladder_sparse_fraction=0.5, ladder_num_rungs=2, omit_in=omit_in, activation_scores=scores),
    )
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(gm.graph.nodes))
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    steps, per_step, losses = 12, [], []
    for step in range(steps):
        handle.set_rate(omission_rate_at(handle.config, step, steps))
        handle.new_step()
        before = len(compiles)
        loss = compiled(input_ids=batch(seed=step), labels=batch(seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        per_step.append(len(compiles) - before)
        losses.append(loss.item())
    rates = [omission_rate_at(handle.config, s, steps) for s in range(steps)]
    rung_starts = {s for s in range(1, steps) if rates[s] != rates[s - 1]}
    assert per_step[0] > 0 and all(torch.isfinite(torch.tensor(losses)))
    assert all(n == 0 for s, n in enumerate(per_step) if s > 0 and s not in rung_starts), (per_step, rates)
