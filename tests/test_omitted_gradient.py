"""omitted_gradient sampled: under a dense forward, the omitted MLP channels' weights get a gradient
estimated on a row sample (scaled to the batch) instead of none; everything else is unchanged.

The reference: the masked dense reference of the same draw (reference.py), plus, per MLP block, the
omitted channels' path recomputed on the sampled rows from a detached block input with copies of
the weights, scaled by the sample's factor and added to the block's output as ``z - z.detach()``
(zero in value): its gradients are the estimate, on the copies, and it passes none to the input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference import loss_and_grads, masked
from tiny import batch, build, sparse

from sat_trainer import SATConfig, SATConfigError, remove_sat

MLP = ("gate_proj", "up_proj", "down_proj")


def _omitted(unit) -> torch.Tensor:
    keep = torch.zeros(unit.n, dtype=torch.bool)
    keep[unit.output_index(unit.output)] = True
    return (~keep).nonzero().squeeze(1)


def _reference_grads(model, handle, ids) -> dict[str, torch.Tensor]:
    """The masked reference's gradients plus the sampled estimate for each MLP's omitted slices."""
    reference = copy.deepcopy(model)
    remove_sat(reference)  # an unpatched copy carrying the same weights
    reference.train()
    copies, hooks = {}, []
    for unit in handle.units:
        if unit.kind != "mlp":
            continue
        mlp = reference.get_submodule(unit.name)
        sample = unit.row_sample(torch.empty(ids.numel(), 1))  # this draw's rows (row count: the batch's tokens)
        om = _omitted(unit)
        ws = {a: getattr(mlp, a).weight.detach().clone().requires_grad_() for a in MLP}
        bs = {a: getattr(mlp, a).bias.detach().clone().requires_grad_() for a in MLP[:2] if getattr(mlp, a).bias is not None}
        copies[unit.name] = (ws, bs)

        def hook(mod, args, out, ws=ws, bs=bs, om=om, sample=sample):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).index_select(0, sample.rows)
            gate, up = (F.linear(x, ws[a][om], bs[a][om] if a in bs else None) for a in MLP[:2])
            z = F.linear(mod.act_fn(gate) * up, ws["down_proj"][:, om]) * sample.scale
            flat = out.reshape(-1, out.shape[-1]).index_add(0, sample.rows, z - z.detach())
            return flat.reshape(out.shape)

        hooks.append(mlp.register_forward_hook(hook))
    with masked(reference, handle):
        _, _, grads = loss_and_grads(reference, ids)
    for hook in hooks:
        hook.remove()
    for name, (ws, bs) in copies.items():
        for attr, tensor in [*ws.items(), *((a + ".bias", t) for a, t in bs.items())]:
            key = f"{name}.{attr}" + ("" if attr.endswith(".bias") else ".weight")
            grads[key] = grads[key] + tensor.grad
    return grads


@pytest.mark.parametrize("omit_in", ["backward", "weight_gradient"])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sampled_estimate_matches_its_reference(family, omit_in):
    """Every gradient equals the reference's; the omitted slices' are no longer zero; and the
    embedding's (upstream of every block) is the same as without the sample: the input gradient
    still passes through the kept channels only."""
    model = build(family)
    plain = copy.deepcopy(model)
    handle = sparse(model, targets=["mlp", "attention"], omit_in=omit_in, omitted_gradient="sampled", omitted_gradient_fraction=0.25)
    ids = batch()
    _, _, grads = loss_and_grads(model, ids)
    expected = _reference_grads(model, handle, ids)
    assert grads.keys() == expected.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    for unit in (u for u in handle.units if u.kind == "mlp"):
        om = _omitted(unit)
        assert torch.count_nonzero(unit.output.weight.grad[:, om]) > 0
        assert torch.count_nonzero(unit.inputs[0].weight.grad[om]) > 0
        assert unit.row_sample(torch.empty(ids.numel(), 1)).rows.numel() == 8  # ceil(0.25 * 32 tokens)
    plain_handle = sparse(plain, targets=["mlp", "attention"], omit_in=omit_in)
    _, _, plain_grads = loss_and_grads(plain, ids)
    assert [u.output_index(u.output).tolist() for u in plain_handle.units] == [u.output_index(u.output).tolist() for u in handle.units]
    embed = "model.embed_tokens.weight"
    torch.testing.assert_close(grads[embed], plain_grads[embed], atol=1e-6, rtol=1e-5)


def test_whole_batch_sample_gives_the_dense_weight_gradient():
    """With weight_gradient (dense input gradients) and every row sampled, the estimate is exact:
    every gradient is the dense model's."""
    model = build("llama")
    _, _, dense = loss_and_grads(copy.deepcopy(model).train(), batch())
    sparse(model, targets=["mlp"], omit_in="weight_gradient", omitted_gradient="sampled", omitted_gradient_fraction=1.0)
    _, _, grads = loss_and_grads(model, batch())
    for name in dense:
        torch.testing.assert_close(grads[name], dense[name], atol=1e-5, rtol=1e-4, msg=name)


def test_rows_follow_the_draw_and_survive_checkpoint_recompute():
    """The same rows for every call of one draw (gradient checkpointing recomputes the forward),
    new rows for the next draw; with checkpointing the gradients are those without."""
    model = build("llama")
    ckpt = copy.deepcopy(model)
    cfg = dict(targets=["mlp"], omit_in="backward", omitted_gradient="sampled", omitted_gradient_fraction=0.25)
    handle = sparse(model, **cfg)
    _, _, grads = loss_and_grads(model, batch())
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    sparse(ckpt, **cfg)
    _, _, ckpt_grads = loss_and_grads(ckpt, batch())
    for name in grads:
        torch.testing.assert_close(ckpt_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    unit = handle.units[0]
    first = unit.row_sample(torch.empty(32, 1)).rows.tolist()
    handle.new_step()
    assert unit.row_sample(torch.empty(32, 1)).rows.tolist() != first


def test_flops_count_the_estimate():
    """kept_flops_fraction adds the sample's share of full-size weight gradients (and, under
    backward, of the output projection's input gradient) to the sparse step's count."""
    model, other = build("llama"), build("llama")
    plain = sparse(other, targets=["mlp"], omit_in="backward")
    sampled = sparse(model, targets=["mlp"], omit_in="backward", omitted_gradient="sampled", omitted_gradient_fraction=0.25)
    mlp = sum(p.numel() for n, p in model.named_parameters() if "mlp" in n and n.endswith("weight"))
    down = sum(p.numel() for n, p in model.named_parameters() if "down_proj.weight" in n)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    core = (sampled.kept_flops_fraction() - plain.kept_flops_fraction()) * 3
    # the attention core's FLOPs are in the denominator too: the difference is at most the linear-layer one
    assert 0 < core <= 0.25 * (mlp + down) / total + 1e-9
    assert core == pytest.approx(0.25 * (mlp + down) / total, rel=0.1)


@pytest.mark.parametrize(
    "settings",
    [
        dict(omitted_gradient="sampled"),  # omit_in forward_backward: the omitted channels have no forward
        dict(omitted_gradient="sampled", omit_in="backward", targets=["attention"]),
        dict(omitted_gradient="sampled", omit_in="backward", sparse_tokens="context"),
        dict(omitted_gradient="sampled", omit_in="backward", omitted_gradient_fraction=0.0),
        dict(omitted_gradient="all", omit_in="backward"),
    ],
)
def test_bad_settings_are_refused(settings):
    with pytest.raises(SATConfigError, match="omitted_gradient"):
        SATConfig(**settings)
