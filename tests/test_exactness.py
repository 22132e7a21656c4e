"""Invariant 1: for a fixed kept set, the sliced forward equals the masked dense model, in output
and gradients; omitted rows/columns get exactly zero gradient."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from reference import loss_and_grads, masked
from tiny import (
    ALL_FAMILY_CONFIGS,
    FAMILY_CONFIGS,
    LLAMA_STYLE_ATTENTION,
    MORE_FAMILIES,
    NO_SDPA,
    batch,
    build,
    sat_config,
    sparse,
)

from sat_trainer import apply_sat, remove_sat
from sat_trainer.patch.registry import FAMILIES, supported_model_types

# The first nine families and Phi-3 (fused gate_up_proj and qkv_proj) run every metric and omit_in mode;
# every registry entry runs test_every_registered_family_matches_masked_reference.
CASES = [(f, "eager") for f in [*FAMILY_CONFIGS, "phi3"]] + [
    (f, "sdpa") for f in [*LLAMA_STYLE_ATTENTION, "phi3"] if f not in NO_SDPA
]


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
@pytest.mark.parametrize("metric", ["wanda", "maxip", "activation"])
def test_sliced_equals_masked_dense(family, attn, metric):
    model = build(family, attn)
    handle = _assert_matches_masked_reference(model, metric=metric)
    kinds = {u.kind for u in handle.units}
    assert kinds == {s.kind for s in FAMILIES[family]}
    assert ("attention" in kinds) == (family in [*LLAMA_STYLE_ATTENTION, "phi3"])
    assert all(u.k() < u.n for u in handle.units)
    remove_sat(model)


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
@pytest.mark.parametrize("attention_unit", ["kv_group", "query_head"])
def test_backward_only_forward_is_dense_and_gradients_are_cut(family, attn, attention_unit):
    """omit_in backward: the same logits as the unpatched model, the gradients of the reference
    whose omitted units' backward paths are cut, and zero gradient on every omitted slice."""
    model = build(family, attn)
    dense_logits = copy.deepcopy(model).train()(batch()).logits.detach()
    handle = _assert_matches_masked_reference(model, metric="activation", omit_in="backward", attention_unit=attention_unit)
    torch.testing.assert_close(model(batch()).logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert all(u.k() < u.n for u in handle.units)
    attention = [u for u in handle.units if u.kind == "attention"]
    assert all(u.block.num_key_value_groups == 2 for u in attention)  # a dense forward keeps GQA's own count
    remove_sat(model)


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "qwen3"])
@pytest.mark.parametrize("omit_in", ["backward", "weight_gradient"])
def test_dense_forward_draws_at_the_output_projection_and_stays_exact(family, omit_in):
    """activation_scores training_forward with a dense forward: the MLP's kept set is drawn at its down
    projection from that forward's own outputs, after gate/up ran (they read it in backward), and
    attention's at its value projection from its values (phi3: the v rows of the fused qkv).
    Exact against the masked reference for that kept set."""
    model = build(family)
    draws = []
    handle = _assert_matches_masked_reference(model, metric="activation", omit_in=omit_in, activation_scores="training_forward")
    for unit in handle.units:
        original = unit._draw
        unit._draw = lambda x, key, hidden=False, u=unit, f=original: (
            draws.append((u.name, hidden, x.shape[-1])),
            f(x, key, hidden),
        )[1]
    handle.new_step()
    loss_and_grads(model, batch())
    # one draw per block, from this forward: an MLP's from its channels' outputs (the down projection's input),
    # attention's from its values (every KV head's head_dim features)
    assert sorted(draws) == sorted((u.name, True, u.n if u.kind == "mlp" else _value_width(model.config)) for u in handle.units)
    remove_sat(model)


def _value_width(cfg) -> int:
    """Features of the value projection's output: every KV head's head_dim."""
    return cfg.num_key_value_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


@pytest.mark.parametrize("family,attn", CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_weight_gradient_only_skips_the_omitted_weight_gradients(family, attn):
    """omit_in weight_gradient: dense logits and input gradients, so every gradient but the
    omitted units' weights' equals the dense model's; those are zero."""
    model = build(family, attn)
    _, _, dense_grads = loss_and_grads(copy.deepcopy(model).train(), batch())
    handle = _assert_matches_masked_reference(model, metric="activation", omit_in="weight_gradient")
    _, _, grads = loss_and_grads(model, batch())
    embeddings = next(n for n in grads if "wte" in n or "embed_tokens" in n)
    torch.testing.assert_close(grads[embeddings], dense_grads[embeddings], atol=1e-6, rtol=1e-5)  # exact upstream gradient
    assert all(u.k() < u.n for u in handle.units)
    remove_sat(model)


def _omits_attention(family: str) -> bool:
    return any(s.kind == "attention" for s in FAMILIES[family])


EVERY_FAMILY = [(f, "eager") for f in supported_model_types()] + [
    (f, "sdpa") for f in MORE_FAMILIES if _omits_attention(f) and f not in NO_SDPA
]


@pytest.mark.parametrize("family,attn", EVERY_FAMILY, ids=[f"{f}-{a}" for f, a in EVERY_FAMILY])
def test_every_registered_family_matches_masked_reference(family, attn):
    """Every registry entry, on its own tiny model: MLP channels and (where the family omits
    them) attention KV groups sliced at once, exact against the masked dense reference."""
    assert family in ALL_FAMILY_CONFIGS, f"{family} is registered but has no tiny config in tests/tiny.py"
    model = build(family, attn)
    handle = _assert_matches_masked_reference(model, metric="activation")
    assert {u.kind for u in handle.units} == {s.kind for s in FAMILIES[family]}
    assert len(handle.units) == 2 * len(FAMILIES[family])  # every block of both layers was found
    assert all(u.k() < u.n for u in handle.units)
    remove_sat(model)


@pytest.mark.parametrize("family,option", [("cohere", "use_qk_norm")])
def test_per_head_qk_norm_option_keeps_attention_dense_and_the_mlp_exact(family, option, caplog):
    """A config option that gives attention per-head weights read by head position: its KV groups
    are not omitted (one log line naming the option), its MLP still is, exactly."""
    model = build(family, **{option: True})
    with caplog.at_level(logging.WARNING, logger="sat_trainer"):
        handle = _assert_matches_masked_reference(model, metric="activation")
    assert {u.kind for u in handle.units} == {"mlp"}
    lines = [r.getMessage() for r in caplog.records if "attention heads are not omitted" in r.getMessage()]
    assert len(lines) == 1 and option in lines[0] and family in lines[0]
    remove_sat(model)


def test_every_family_with_a_tiny_config_is_registered():
    assert set(ALL_FAMILY_CONFIGS) == set(supported_model_types())


def _assert_matches_masked_reference(model, **cfg):
    """One sparse step of ``model`` against the masked dense reference (outputs, loss, every
    gradient), and exactly zero gradient on what was omitted; returns the handle."""
    reference = copy.deepcopy(model).train()
    handle = sparse(model, **cfg)
    ids = batch()
    loss, logits, grads = loss_and_grads(model, ids)
    with masked(reference, handle):
        ref_loss, ref_logits, ref_grads = loss_and_grads(reference, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    _assert_omitted_grads_zero(model, handle)
    return handle


def _assert_omitted_grads_zero(model, handle):
    """Omitted rows of input projections and columns of the output projection: exactly 0."""
    for unit in handle.units:
        for position, proj in enumerate(unit.inputs):
            grad = _out_major_grad(proj)
            kept = unit.input_index(proj, torch.zeros(1, 1))
            kept = kept() if callable(kept) else kept  # drawn at the output projection, read in backward
            omitted = _complement(kept, grad.shape[0])
            assert omitted.numel() > 0
            assert torch.count_nonzero(grad.index_select(0, omitted)) == 0, f"{unit.name} input {position}"
            kept_rows = grad.index_select(0, kept)
            assert torch.count_nonzero(kept_rows) > 0
        grad = _out_major_grad(unit.output)
        omitted = _complement(unit.output_index(unit.output), grad.shape[1])
        assert torch.count_nonzero(grad.index_select(1, omitted)) == 0, f"{unit.name} output"


def _out_major_grad(proj):
    return proj.weight.grad.t() if type(proj).__name__ == "Conv1D" else proj.weight.grad


def _complement(idx: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[idx] = False
    return mask.nonzero().squeeze(1)


def test_attention_drops_whole_kv_groups():
    model = build("llama")
    handle = apply_sat(model, sat_config(omission_rate=0.5, targets=["attention"]))
    model.train()
    handle.set_rate(0.5)
    handle.new_step()
    model(batch())
    for name, heads in handle.kept().items():
        groups = heads.div(2, rounding_mode="floor")  # 8 query heads / 4 KV heads
        assert heads.numel() == 4 and groups.unique().numel() == 2, name
        assert torch.equal(heads, torch.cat([torch.arange(2 * g, 2 * g + 2) for g in groups.unique()]))


QUERY_HEAD_CASES = [(f, "eager") for f in LLAMA_STYLE_ATTENTION] + [("llama", "sdpa"), ("qwen3", "sdpa")]


@pytest.mark.parametrize("family,attn", QUERY_HEAD_CASES, ids=[f"{f}-{a}" for f, a in QUERY_HEAD_CASES])
def test_query_head_unit_equals_masked_dense_and_keeps_kv_dense(family, attn):
    model = build(family, attn)
    ids = batch()
    handle = _assert_matches_masked_reference(model, metric="activation", attention_unit="query_head")
    attention = [u for u in handle.units if u.kind == "attention"]
    for unit in attention:
        heads = unit.kept_query_or_channels()  # 8 query heads in 4 KV groups of 2: one kept per group
        assert torch.equal(heads.div(2, rounding_mode="floor"), torch.arange(4)), unit.name
        assert unit.block.num_key_value_groups == 1
        assert torch.count_nonzero(unit.block.k_proj.weight.grad.abs().sum(1)) == unit.block.k_proj.weight.shape[0]
    model.eval()
    with torch.no_grad():
        model(ids)  # dense again: the block's own GQA repeat count is back
    assert all(u.block.num_key_value_groups == 2 for u in attention)
    remove_sat(model)
    assert all(u.block.num_key_value_groups == 2 for u in attention)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phi3_fused_qkv_query_head_unit_slices_q_only_and_keeps_kv_whole(attn):
    """Phi-3 with ``attention_unit: query_head``: the fused qkv_proj computes the kept query heads'
    rows and every k and v row ([q_kept | k | v]); exact against the masked reference, and while
    sparse the block reads the kept query-head count and its own KV-head count."""
    model = build("phi3", attn)
    handle = _assert_matches_masked_reference(model, metric="activation", attention_unit="query_head")
    for unit in (u for u in handle.units if u.kind == "attention"):
        heads = unit.kept_query_or_channels()  # one of the 2 query heads of each of the 4 KV groups
        assert torch.equal(heads.div(2, rounding_mode="floor"), torch.arange(4)), unit.name
        block = unit.block
        assert (block.config.num_attention_heads, block.num_key_value_heads, block.num_key_value_groups) == (4, 4, 1)
        kv_rows = block.qkv_proj.weight.grad[8 * 16 :]  # after the 8 query heads of head_dim 16: every k and v row
        assert torch.count_nonzero(kv_rows.abs().sum(1)) == 2 * 4 * 16
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 4
    remove_sat(model)


def _sft_batch(size: int = 2, length: int = 16):
    """Ids and labels of a chat-like batch: the first tokens of each row are context (-100), as is padding."""
    ids = batch(size=size, length=length)
    labels = ids.clone()
    labels[0, :9] = -100  # a prompt, then a response
    labels[1, :4] = -100
    labels[1, 12:] = -100  # a short response, then padding
    return ids, labels


SPLIT_CASES = [
    ("llama", "forward_backward", "subsample"),
    ("llama", "backward", "subsample"),
    ("gpt2", "forward_backward", "subsample"),
    ("gpt2", "backward", "subsample"),
    ("qwen3", "backward", "subsample"),
    ("llama", "backward", "training_forward"),
    ("gpt2", "backward", "training_forward"),
    ("llama", "forward_backward", "training_forward"),
    ("gpt2", "forward_backward", "training_forward"),
]


@pytest.mark.parametrize("family,omit_in,scores", SPLIT_CASES, ids=["-".join(c) for c in SPLIT_CASES])
def test_context_tokens_sparse_and_loss_tokens_dense(family, omit_in, scores):
    """sparse_tokens context: the loss tokens (label, or the next token's label, not -100) run
    every channel, the context tokens only the kept ones; exact against the reference masked on
    the context rows only (with activation_scores training_forward the kept set is drawn at the down
    projection, after gate/up ran)."""
    model = build(family)
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], sparse_tokens="context", omit_in=omit_in, activation_scores=scores)
    ids, labels = _sft_batch()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    dense_rows, sparse_rows = handle.token_split
    # row 0: labels from position 9, so positions 8.. are dense; row 1: labels 4..11, so positions 3..11
    assert dense_rows.tolist() == list(range(8, 16)) + list(range(16 + 3, 16 + 12))
    assert sparse_rows.numel() == 32 - dense_rows.numel()
    with masked(reference, handle):
        ref = reference(ids, labels=labels)
        ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # the split really changed something: without labels every row is sparse, and that differs
    with torch.no_grad():
        all_sparse = model(ids).logits
    assert handle.token_split is None
    if omit_in == "forward_backward":
        assert not torch.allclose(all_sparse, out.logits, atol=1e-4)
    remove_sat(model)


def test_context_split_runs_each_row_set_through_the_block_once():
    """With a sliced forward the split is the MLP block's: its own forward runs once on the loss rows at every
    channel and once on the context rows at the kept width, so gate/up/down each see one contiguous row set
    per call (no full-width intermediate for the context rows); with a dense forward the projections see all rows."""
    for omit_in in ("forward_backward", "backward"):
        model = build("llama")
        handle = sparse(model, targets=["mlp"], sparse_tokens="context", omit_in=omit_in)
        mlp = model.model.layers[0].mlp
        seen = {"gate": [], "down": []}
        hooks = [
            mlp.gate_proj.register_forward_hook(lambda m, a, o: seen["gate"].append((tuple(a[0].shape), o.shape[-1]))),
            mlp.down_proj.register_forward_hook(lambda m, a, o: seen["down"].append(tuple(a[0].shape))),
        ]
        ids, labels = _sft_batch()
        model(ids, labels=labels).loss.backward()
        for hook in hooks:
            hook.remove()
        n_dense, n_sparse = (rows.numel() for rows in handle.token_split)
        hidden, width = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        k = next(u for u in handle.units if u.block is mlp).kept_units.numel()
        if omit_in == "forward_backward":
            assert seen["gate"] == [((1, n_dense, hidden), width), ((1, n_sparse, hidden), k)]
            assert seen["down"] == [(1, n_dense, width), (1, n_sparse, k)]
        else:
            assert seen["gate"] == [((2, 16, hidden), width)] and seen["down"] == [(2, 16, width)]
        remove_sat(model)


@pytest.mark.parametrize("labelled", [False, True], ids=["all-context", "all-loss"])
def test_context_split_with_one_row_set_empty(labelled):
    """A forward whose tokens are all context (every label -100) or all loss tokens runs the block once, on the
    non-empty row set, exact against the reference masked on the context rows."""
    model = build("llama")
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], sparse_tokens="context")
    ids = batch()
    labels = ids.clone() if labelled else torch.full_like(ids, -100)
    out = model(ids, labels=labels)
    out.logits.sum().backward()
    assert [rows.numel() for rows in handle.token_split] == ([32, 0] if labelled else [0, 32])
    with masked(reference, handle):
        ref = reference(ids, labels=labels)
        ref.logits.sum().backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    remove_sat(model)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_context_split_is_exact_for_packed_rows(checkpointing):
    """Packing (two sequences in one row, positions restarting, each with its own prompt and response) under
    the block-level split, with and without gradient checkpointing: logits and every gradient equal the
    reference masked on the context rows only."""
    model = build("llama")
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], sparse_tokens="context")
    ids = batch(size=2, length=16)
    positions = torch.cat([torch.arange(7), torch.arange(9)]).repeat(2, 1)
    labels = ids.clone()
    labels[:, :3] = -100  # sequence 1: prompt 0..2, response 3..6
    labels[:, 7:12] = -100  # sequence 2: prompt 7..11, response 12..15
    labels[1, 14:] = -100  # row 1 ends in padding-like context
    model.zero_grad(set_to_none=True)
    out = model(ids, position_ids=positions, labels=labels)
    out.loss.backward()
    assert 0 < handle.token_split[0].numel() < 32
    with masked(reference, handle):
        ref = reference(ids, position_ids=positions, labels=labels)
        ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    remove_sat(model)


def test_context_split_under_weight_gradient_cuts_only_the_sparse_rows_weight_gradients():
    """sparse_tokens context with omit_in weight_gradient: dense logits and input gradients; each
    MLP weight's gradient is dense's minus what the context rows would add to its omitted
    rows/columns (the reference: the dense run's per-projection inputs and output gradients)."""
    model = build("llama")
    reference = copy.deepcopy(model).train()
    handle = sparse(model, targets=["mlp"], sparse_tokens="context", omit_in="weight_gradient")
    ids, labels = _sft_batch()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels)
    out.loss.backward()
    seen: dict = {}

    def keep(name):
        def hook(module, args, output):
            output.register_hook(
                lambda g: seen.__setitem__(name, (args[0].reshape(-1, args[0].shape[-1]), g.reshape(-1, g.shape[-1])))
            )

        return hook

    hooks = [
        m.register_forward_hook(keep(n))
        for n, m in reference.named_modules()
        if n.endswith(("gate_proj", "up_proj", "down_proj"))
    ]
    ref = reference(ids, labels=labels)
    ref.loss.backward()
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    sparse_rows = handle.token_split[1]
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}
    for unit in handle.units:
        omitted = torch.ones(unit.n)
        omitted[unit.kept_units] = 0.0
        for attr in ("gate_proj", "up_proj", "down_proj"):
            x, g = (t.index_select(0, sparse_rows) for t in seen[f"{unit.name}.{attr}"])
            extra = g.t() @ x  # (out, in): what the context rows add
            expected[f"{unit.name}.{attr}.weight"] -= extra * (omitted if attr == "down_proj" else omitted.unsqueeze(1))
            if attr != "down_proj" and f"{unit.name}.{attr}.bias" in expected:
                expected[f"{unit.name}.{attr}.bias"] -= g.sum(0) * omitted
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)
    assert sparse_rows.numel() and all(u.k() < u.n for u in handle.units)
    remove_sat(model)


def test_context_split_needs_mlp_only_targets():
    from sat_trainer import SATConfig, SATError

    with pytest.raises(SATError, match="sparse_tokens"):
        SATConfig(sparse_tokens="context", targets=["mlp", "attention"])
