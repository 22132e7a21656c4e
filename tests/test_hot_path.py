"""The training step's hot path: no host-device synchronisation, gradients through the sliced op
(micro-batch accumulation, cached slices never stale), and torch.compile without a graph break
per projection.

The custom sliced op runs on CUDA only (``ops.KEPT_OP_DEVICES``); the ``kept_op`` fixture forces
it on the CPU too, so the exactness tests of the other modules run here once more, unchanged,
through it (fp32, bf16 autocast, LoRA, Conv1D, checkpointing, compile)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import test_exactness
import test_lora
import test_patching
import test_stack_precision_compile
import torch
from reference import loss_and_grads, masked
from tiny import batch, build, sparse

from sat_trainer import ops
from sat_trainer.config import METRICS, SELECTIONS
from sat_trainer.patch import scoring, units

# what reads a tensor's values on the host: a device sync when the tensor lives on a GPU
HOST_READS = ("cpu", "item", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(params=["device default", "kept op"])
def op_path(request, monkeypatch):
    """Each test using it runs through the CPU's default path and through the custom op."""
    if request.param == "kept op":
        monkeypatch.setattr(ops, "KEPT_OP_DEVICES", ("cpu", "cuda"))
    return request.param


@pytest.fixture
def kept_op(monkeypatch):
    monkeypatch.setattr(ops, "KEPT_OP_DEVICES", ("cpu", "cuda"))


@pytest.mark.parametrize("family,attn", test_exactness.CASES, ids=[f"{f}-{a}" for f, a in test_exactness.CASES])
def test_kept_op_is_exact(kept_op, family, attn):
    test_exactness.test_sliced_equals_masked_dense(family, attn, "wanda")


@pytest.mark.parametrize("targets", test_lora.SUBSETS, ids=["all", "gate-down", "up-q-v", "o-k"])
def test_kept_op_is_exact_with_lora(kept_op, targets):
    test_lora.test_lora_exact_against_masked_dense(targets, "forward_backward")


def test_kept_op_with_merged_disabled_and_multiple_adapters(kept_op):
    test_lora.test_merged_disabled_and_multiple_adapters()


def test_kept_op_with_checkpointing(kept_op):
    test_lora.test_gradient_checkpointing_with_lora_gives_same_loss_and_grads("forward_backward")
    test_patching.test_gradient_checkpointing_reuses_the_kept_set("wanda", True, "forward_backward", "llama", "subsample")


@pytest.mark.slow
def test_kept_op_with_bf16_and_compile(kept_op):
    test_stack_precision_compile.test_bf16_autocast_step_is_close_to_fp32_for_the_same_kept_set("forward_backward")
    test_stack_precision_compile.test_bf16_weights_train_with_finite_loss_and_grads()
    test_stack_precision_compile.test_compile_recompiles_only_when_k_changes("forward_backward", "subsample")


@contextlib.contextmanager
def _inside_sat(monkeypatch, enter, leave):
    """Call ``enter``/``leave`` around every piece of SAT code a training step runs: the index
    lookups (which draw: scores, selection, generators), the sliced op's forward and backward."""

    def wrap(fn):
        def wrapped(*args, **kwargs):
            enter()
            try:
                return fn(*args, **kwargs)
            finally:
                leave()

        return wrapped

    monkeypatch.setattr(units.BlockUnit, "input_index", wrap(units.BlockUnit.input_index))
    monkeypatch.setattr(units.BlockUnit, "output_index", wrap(units.BlockUnit.output_index))
    monkeypatch.setattr(units, "kept_linear", wrap(ops.kept_linear))
    monkeypatch.setattr(ops._KeptLinear, "backward", staticmethod(wrap(ops._KeptLinear.backward)))
    monkeypatch.setattr(units, "backward_kept_linear", wrap(ops.backward_kept_linear))
    monkeypatch.setattr(ops._BackwardKeptLinear, "backward", staticmethod(wrap(ops._BackwardKeptLinear.backward)))
    monkeypatch.setattr(scoring.BlockScorer, "observe", wrap(scoring.BlockScorer.observe))
    monkeypatch.setattr(scoring.BlockScorer, "given_rows", wrap(scoring.BlockScorer.given_rows))
    yield


@pytest.mark.slow
@pytest.mark.parametrize("omit_in", ["forward_backward", "backward"])
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("metric", METRICS)
def test_a_step_that_draws_reads_nothing_back_to_the_host(monkeypatch, op_path, metric, selection, omit_in):
    model = build("llama")
    # a subsample of 6 of the 32 tokens: the activation metric's forward then reuses the subsample's rows
    handle = sparse(
        model, metric=metric, selection=selection, omit_in=omit_in, activation_tokens=6, activation_token_fraction=0.1
    )
    depth = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def trap(name):
        def trapped(self, *args, **kwargs):
            if depth[0]:
                raise AssertionError(f"Tensor.{name} inside a SAT training step (a host sync on a GPU)")
            return originals[name](self, *args, **kwargs)

        return trapped

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    with _inside_sat(monkeypatch, lambda: depth.__setitem__(0, depth[0] + 1), lambda: depth.__setitem__(0, depth[0] - 1)):
        for _ in range(2):  # the second step draws again, with scores cached or not (score_every)
            loss = model(batch(), labels=batch()).loss
            loss.backward()
            handle.new_step()
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, originals[name])
    assert all(len(k) < 96 for k in handle.kept().values())  # the steps were sparse; kept() reads lazily


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("metric", METRICS)
def test_no_cuda_sync_in_a_sat_step(monkeypatch, metric):
    model = build("llama").cuda()
    handle = sparse(model, metric=metric, selection="sampling")
    model(batch().cuda(), labels=batch().cuda()).loss.backward()  # warm-up: lazy CUDA initialisation may sync
    handle.new_step()
    with _inside_sat(monkeypatch, lambda: torch.cuda.set_sync_debug_mode("error"), lambda: torch.cuda.set_sync_debug_mode(0)):
        model(batch().cuda(), labels=batch().cuda()).loss.backward()
    torch.cuda.synchronize()


def test_gradients_accumulate_exactly_over_micro_batches_of_one_draw(op_path):
    """Two micro-batches of one draw: the second reuses the cached slices and adds into .grad."""
    model = build("llama", mlp_bias=True)
    reference = copy.deepcopy(model)
    handle = sparse(model)
    model.zero_grad(set_to_none=True)
    for seed in (1, 2):
        model(batch(seed), labels=batch(seed)).loss.backward()
    reference.train()
    with masked(reference, handle):
        for seed in (1, 2):
            reference(batch(seed), labels=batch(seed)).loss.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_an_optimizer_step_without_a_new_draw_never_reuses_stale_slices(op_path):
    """Fused AdamW does not bump the parameters' version counter: the cache must still notice."""
    model = build("llama")
    reference = copy.deepcopy(model)
    handle = sparse(model, metric="magnitude")
    reference.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (model, reference)]
    for step in range(3):
        loss, _, _ = loss_and_grads(model, batch(step))
        with masked(reference, handle):
            ref_loss, _, _ = loss_and_grads(reference, batch(step))
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for opt in opts:
            opt.step()


def _graph_breaks(layers: int) -> tuple[int, int, set[str]]:
    model = build("llama", num_hidden_layers=layers)
    handle = sparse(model)
    ids = batch()
    explained = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    reasons = {r.reason.splitlines()[0] for r in explained.break_reasons}
    return explained.graph_break_count, len(handle.units), reasons


@pytest.mark.slow
def test_compile_breaks_the_graph_once_per_block_not_per_projection(op_path):
    breaks_2, blocks_2, reasons_2 = _graph_breaks(2)
    breaks_4, blocks_4, reasons_4 = _graph_breaks(4)
    assert breaks_4 - breaks_2 == blocks_4 - blocks_2  # each added block (4+ projections) adds one break
    assert all("torch.compiler.disable" in r for r in reasons_2 | reasons_4), reasons_2 | reasons_4
