"""LTE (sat_trainer.lte): exactness of the routed forward against the dense model and a masked dense reference,
balanced expert grouping, the stage-1 losses, save/load, the Trainer callback's two stages, and bad input."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers
from tiny import ALL_FAMILY_CONFIGS, batch, build

from sat_trainer import LTECallback, LTEConfig, LTEConfigError, LTEError, apply_lte, load_lte
from sat_trainer.lte.baselines import TopKExperts
from sat_trainer.lte.experts import ExpertGroups, balanced_assign, balanced_kmeans, coactivation_features, group_neurons
from sat_trainer.lte.losses import SEPARABILITY_FLOOR, efficiency_loss, separability_loss
from sat_trainer.lte.measure import gated_mlps
from sat_trainer.lte.model import CONFIG_NAME, WEIGHTS_NAME, gated_model_types
from sat_trainer.lte.router import ROUTER_ATTR, gated_activation

NO_LOSSES = {"efficiency_weight": 0.0, "separability_weight": 0.0}
GATED_TINY = [f for f in gated_model_types() if f in ALL_FAMILY_CONFIGS]


def _dense_and_routed(family: str = "llama", **cfg):
    model = build(family)
    reference = copy.deepcopy(model)
    handle = apply_lte(model, {"expert_size": 16, **cfg})
    return reference, model, handle


# ---- exactness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", GATED_TINY)
def test_every_expert_active_equals_the_dense_model(family):
    """Routers at zero score 0.5 everywhere, over a threshold of 0.4: stage hard runs every expert, bit for bit dense."""
    reference, model, handle = _dense_and_routed(family, router_init="zeros", threshold=0.4, **NO_LOSSES)
    handle.set_stage("hard")
    ids = batch()
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(reference, mode)()
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def _masked_reference(reference: torch.nn.Module, handle, stage: str):
    """Hooks on an unrouted copy: each MLP's down projection input times the per-neuron weight computed from the
    MLP's input by a copy of its router (soft: the expert's score; hard: score > threshold). Returns the router
    copies (leaf tensors) and the hooks."""
    modules = dict(reference.named_modules())
    routers, hooks = [], []
    for block in handle.blocks:
        mlp = modules[block.name]
        weight = block.router.weight.detach().clone().requires_grad_(stage == "soft")
        bias = block.router.bias.detach().clone().requires_grad_(stage == "soft")
        routers.append((weight, bias))
        seen = {}
        hooks.append(mlp.register_forward_pre_hook(lambda m, args, seen=seen: seen.__setitem__("x", args[0])))

        def scale(m, args, seen=seen, weight=weight, bias=bias, lr_scale=block.router.lr_scale, expert_of=block.expert_of):
            x = seen["x"] if handle.config.router_grad_to_model else seen["x"].detach()
            scores = torch.sigmoid((x @ weight.t() + bias) * lr_scale)
            hard = (scores > handle.config.threshold).to(scores.dtype)
            per_expert = hard if stage == "hard" else scores
            if stage == "soft" and handle.config.soft_forward == "straight_through":
                per_expert = hard + scores - scores.detach()
            return (args[0] * per_expert[..., expert_of],)

        hooks.append(getattr(mlp, block.shape.output).register_forward_pre_hook(scale))
    return routers, hooks


def _random_biases(handle, seed: int = 0) -> None:
    """Give every router a bias of its own (stored values), so that a test sees the bias enter the scores."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in handle.blocks:
            block.router.bias.copy_(torch.randn(block.router.bias.shape, generator=generator) / block.router.lr_scale)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
@pytest.mark.parametrize("stage", ["soft", "hard"])
@pytest.mark.parametrize(
    ("lr_scale", "through", "forward"),
    [(1.0, False, "weighted"), (10.0, False, "weighted"), (1.0, True, "weighted"), (1.0, False, "straight_through")],
)
def test_routed_forward_and_gradients_equal_the_masked_dense_reference(family, stage, lr_scale, through, forward):
    reference, model, handle = _dense_and_routed(
        family, router_lr_scale=lr_scale, router_grad_to_model=through, soft_forward=forward, **NO_LOSSES
    )
    _random_biases(handle)
    handle.set_stage(stage)
    routers, hooks = _masked_reference(reference, handle, stage)
    model.train()
    reference.train()
    ids = batch()
    out, ref = model(ids, labels=ids), reference(ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if ROUTER_ATTR not in n}
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
    for block, (weight, bias) in zip(handle.blocks, routers):
        if stage == "soft":
            assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0
            torch.testing.assert_close(block.router.weight.grad, weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(block.router.bias.grad, bias.grad, rtol=1e-4, atol=1e-6)
        else:
            assert block.router.weight.grad is None and not block.router.weight.requires_grad
            assert block.router.bias.grad is None and not block.router.bias.requires_grad
    fractions = handle.active_fractions()
    assert set(fractions) == {b.name for b in handle.blocks}
    if stage == "hard":  # a real selection: some experts off, some on
        assert all(0 < f < 1 for f in fractions.values()), fractions
    for hook in hooks:
        hook.remove()


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_records_once():
    runs = []
    for checkpointing in (False, True):
        model = build("llama")
        handle = apply_lte(model, {"expert_size": 16})
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = batch()
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = [handle.blocks[0].router.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()]
        runs.append((out.loss.detach(), grads, handle.active_fractions(), handle._scores))
    (loss, grads, fractions, _), (loss_gc, grads_gc, fractions_gc, left) = runs
    torch.testing.assert_close(loss, loss_gc)
    for a, b in zip(grads, grads_gc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert fractions == fractions_gc and left == []  # the recompute in backward records nothing


def test_remove_restores_the_dense_model():
    reference, model, handle = _dense_and_routed()
    handle.remove()
    ids = batch()
    assert not any(hasattr(b.block, ROUTER_ATTR) or "forward" in b.block.__dict__ for b in handle.blocks)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    apply_lte(model, {"expert_size": 16})  # routable again


# ---- experts ---------------------------------------------------------------------------------------------------


def test_balanced_kmeans_gives_equal_groups_covering_every_neuron_once():
    features = torch.randn(96, 10)
    assignment = balanced_kmeans(features, 16, iterations=10, seed=3)
    assert torch.equal(torch.bincount(assignment, minlength=6), torch.full((6,), 16))
    groups = ExpertGroups.from_assignment(assignment, 16)
    assert torch.equal(torch.sort(groups.order).values, torch.arange(96))
    assert torch.equal(groups.expert_of, assignment)
    assert torch.equal(balanced_kmeans(features, 16, iterations=10, seed=3), assignment)  # deterministic


def test_balanced_kmeans_recovers_separated_groups():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    features = centers.repeat_interleave(8, dim=0) + 0.1 * torch.randn(32, 2)
    perm = torch.randperm(32)
    assignment = balanced_kmeans(features[perm], 8, seed=1)
    truth = torch.arange(4).repeat_interleave(8)[perm]
    for cluster in range(4):  # each cluster is exactly one blob
        assert truth[assignment == cluster].unique().numel() == 1


def test_balanced_assign_respects_capacity_nearest_first():
    # every row prefers column 0; column 0 takes its two nearest rows, the rest go to column 1
    distance = torch.tensor([[0.1, 5.0], [0.3, 5.0], [0.2, 5.0], [0.4, 5.0]])
    assert balanced_assign(distance, 2).tolist() == [0, 1, 0, 1]


def test_experts_group_gate_and_up_rows_of_the_model():
    model = build("llama")
    handle = apply_lte(model, {"expert_size": 32, "seed": 5})
    mlp = model.model.layers[0].mlp
    features = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=1)
    expected = group_neurons(features, 32, 20, seed=5 + 0)
    assert torch.equal(handle.blocks[0].expert_of, expected.expert_of)
    assert handle.blocks[0].router.weight.shape == (3, 64)


def test_coactivation_features_group_neurons_large_on_the_same_tokens_whatever_their_scale():
    first, second = [0, 3, 5, 6], [1, 2, 4, 7]
    h = torch.zeros(20, 8)
    h[:10, first] = torch.tensor([1.0, -50.0, 0.2, 7.0])  # large on tokens 0-9 (signs and scales differ)
    h[10:, second] = torch.tensor([3.0, 0.1, -9.0, 40.0])
    h += 0.01 * torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    features = coactivation_features(h)
    assert features.shape == (8, 20)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(8))
    groups = group_neurons(features, 4, seed=3)
    assert sorted(sorted(groups.order[e * 4 : (e + 1) * 4].tolist()) for e in range(2)) == [first, second]


def test_top_k_experts_group_by_the_features_given():
    model = build("llama").eval()
    names = [name for name, _, _ in gated_mlps(model)]
    width = model.model.layers[0].mlp.down_proj.in_features
    features = {name: torch.randn(width, 5, generator=torch.Generator().manual_seed(i)) for i, name in enumerate(names)}
    with TopKExperts(model, 0.5, expert_size=16, seed=2, features=features) as mask:
        pass
    for index, (name, (expert_of, _)) in enumerate(zip(names, mask.states)):
        assert torch.equal(expert_of, group_neurons(features[name], 16, 20, seed=2 + index).expert_of)


# ---- losses ----------------------------------------------------------------------------------------------------


def test_losses_on_a_hand_made_case():
    a = torch.tensor([[0.2, 0.9]], requires_grad=True)
    b = torch.tensor([[0.6, 0.5, 0.1, 0.7]], requires_grad=True)
    efficiency = efficiency_loss([a, b])
    assert efficiency.item() == pytest.approx((0.55 + 0.475) / 2)
    efficiency.backward()
    torch.testing.assert_close(a.grad, torch.full_like(a, 1 / (2 * 2)))
    torch.testing.assert_close(b.grad, torch.full_like(b, 1 / (2 * 4)))

    a.grad, b.grad = None, None
    separability = separability_loss([a, b], threshold=0.5)
    per_a = [1 / 0.3**2, 1 / 0.4**2]
    per_b = [1 / 0.1**2, 1 / SEPARABILITY_FLOOR**2, 1 / 0.4**2, 1 / 0.2**2]  # 0.5 sits on the threshold: the floor
    assert separability.item() == pytest.approx((sum(per_a) / 2 + sum(per_b) / 4) / 2, rel=1e-5)
    separability.backward()
    # d/ds |s - t|^-2 = -2 sign(s - t) |s - t|^-3, times 1 / (layers * scores of that layer); zero under the floor
    expect_a = torch.tensor([[2 / 0.3**3, -2 / 0.4**3]]) / 4
    expect_b = torch.tensor([[-2 / 0.1**3, 0.0, 2 / 0.4**3, -2 / 0.2**3]]) / 8
    torch.testing.assert_close(a.grad, expect_a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, expect_b, rtol=1e-4, atol=1e-4)


def test_stage1_losses_enter_the_model_loss_with_labels_only_in_soft_training():
    cfg = {"efficiency_weight": 0.3, "separability_weight": 0.002, "threshold": 0.45}
    _, model, handle = _dense_and_routed(**cfg)
    ids = batch()
    model.train()
    scores = []
    for block in handle.blocks:
        block.block.register_forward_hook(lambda m, args, out, r=block.router: scores.append(r(args[0]).detach()))
    task = copy.deepcopy(handle.config)
    out = model(ids, labels=ids)
    handle.config = LTEConfig(**{**task.to_dict(), **NO_LOSSES})
    plain = model(ids, labels=ids).loss
    handle.config = task
    added = 0.3 * efficiency_loss(scores[:2]) + 0.002 * separability_loss(scores[:2], 0.45)
    torch.testing.assert_close(out.loss.detach(), (plain + added).detach(), rtol=1e-5, atol=1e-6)
    assert set(handle.stage1_losses()) == {"efficiency_loss", "separability_loss"}

    # the Trainer's num_items_in_batch path: the model's loss is not divided by the accumulation steps again
    handle.accumulation_scale = 0.5
    halved = model(ids, labels=ids, num_items_in_batch=ids[:, 1:].numel()).loss
    torch.testing.assert_close(halved.detach(), (plain + 0.5 * added).detach(), rtol=1e-5, atol=1e-6)

    assert model(ids).loss is None  # no labels: nothing added, nothing fails
    handle.stage1_losses()
    handle.set_stage("hard")
    model(ids, labels=ids)
    model.eval()
    handle.set_stage("soft")
    model(ids, labels=ids)
    assert handle.stage1_losses() == {}  # hard stage, eval: the model's own loss only


@pytest.mark.parametrize("through", [False, True])
def test_the_efficiency_loss_reaches_the_model_only_with_router_grad_to_model(through):
    _, model, handle = _dense_and_routed(router_grad_to_model=through)
    model.train()
    scores = []
    for block in handle.blocks:
        block.router.register_forward_hook(lambda m, args, out: scores.append(out))
    model(batch())
    efficiency_loss(scores).backward()
    assert all(b.router.weight.grad.abs().sum() > 0 for b in handle.blocks)
    embedding = model.get_input_embeddings().weight.grad
    assert (embedding is not None and embedding.abs().sum() > 0) == through


# ---- save and load ---------------------------------------------------------------------------------------------


def test_open_routers_start_with_every_expert_on():
    reference, model, handle = _dense_and_routed(router_init="open", router_lr_scale=100.0)
    ids = batch()
    scores = [block.router(torch.randn(3, block.router.weight.shape[1])) for block in handle.blocks]
    assert all(torch.allclose(s, torch.full_like(s, torch.sigmoid(torch.tensor(3.0)).item())) for s in scores)
    handle.set_stage("hard")
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_router_lr_scale_moves_the_effective_router_that_many_times_faster_under_adam():
    moved = {}
    for lr_scale in (1.0, 10.0):
        _, model, handle = _dense_and_routed(router_lr_scale=lr_scale, router_init="normal")
        router = handle.blocks[0].router
        before = router.weight.detach() * lr_scale
        optimizer = torch.optim.Adam(handle.router_parameters(), lr=1e-3)
        ids = batch()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        moved[lr_scale] = (router.weight.detach() * lr_scale - before).abs().mean()
    # the same effective init (seeded), Adam's first step is lr * sign(grad) per stored entry
    torch.testing.assert_close(moved[10.0], 10 * moved[1.0], rtol=1e-3, atol=0)


def test_save_load_round_trip(tmp_path):
    _, model, handle = _dense_and_routed(router_lr_scale=10.0)
    _random_biases(handle)
    handle.set_stage("hard")
    model.eval()
    ids = batch()
    sparse_logits = model(ids).logits
    model.save_pretrained(tmp_path)
    handle.save(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if ROUTER_ATTR in k]
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert [b["layer"] for b in meta["blocks"]] == [0, 1] and meta["config"]["expert_size"] == 16

    # a plain transformers load: every key present, none extra, and the model runs dense
    plain, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    handle.remove()
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert not torch.allclose(plain(ids).logits, sparse_logits)

    loaded = load_lte(plain, tmp_path)
    assert loaded.stage == "hard" and not any(p.requires_grad for p in loaded.router_parameters())
    torch.testing.assert_close(plain(ids).logits, sparse_logits, rtol=0, atol=0)


def test_a_plain_checkpoint_loads_strictly_into_a_routed_model():
    reference, model, _ = _dense_and_routed()
    result = model.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert [k for k in model.state_dict()] == [k for k in reference.state_dict()]


# ---- the Trainer callback --------------------------------------------------------------------------------------


class _Watch(transformers.TrainerCallback):
    """Router weights and requires_grad, and one MLP weight, after every optimizer step."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def on_step_end(self, args, state, control, **kwargs):
        routers = [m.lte_router.weight for m in (layer.mlp for layer in self.model.model.layers)]
        self.steps.append(
            (
                [r.detach().clone() for r in routers],
                [r.requires_grad for r in routers],
                self.model.model.layers[0].mlp.up_proj.weight.detach().clone(),
            )
        )


def test_trainer_runs_stage_one_then_stage_two(tmp_path):
    model = build("llama")
    data = [{"input_ids": ids, "labels": ids} for ids in batch(seed=3, size=8, length=16)]
    args = transformers.TrainingArguments(
        str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    lte = LTECallback({"expert_size": 16, "soft_fraction": 0.5})
    watch = _Watch(model)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[lte, watch])
    initial = [b.router.weight.detach().clone() for b in lte.handle.blocks]
    trainer.train()

    assert lte.switch_step == 2 and lte.handle.stage == "hard"
    routers, requires, up = zip(*watch.steps)
    assert all(requires[0]) and all(requires[1]) and not any(requires[2]) and not any(requires[3])
    assert all(not torch.equal(a, b) for a, b in zip(initial, routers[1]))  # stage 1: the routers trained
    assert all(torch.equal(a, b) for a, b in zip(routers[1], routers[3]))  # stage 2: frozen
    assert not torch.equal(up[1], up[3])  # while the model still trains

    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert [r["lte/hard"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all(0 <= r["lte/active_fraction"] <= 1 and "lte/active_fraction/layer_1" in r for r in rows)
    assert all("lte/efficiency_loss" in r for r in rows[:2]) and not any("lte/efficiency_loss" in r for r in rows[2:])

    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / WEIGHTS_NAME).is_file() and (checkpoint / CONFIG_NAME).is_file()
    plain = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    load_lte(plain, checkpoint)
    model.eval()
    ids = batch()
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


def _expert_norms(block, x: torch.Tensor) -> torch.Tensor:
    """(tokens, experts): each expert's share of the dense MLP's down-projection input, as a norm per token."""
    act = gated_activation(block.block, block.shape, x)
    norms = torch.zeros(x.shape[0], block.router.weight.shape[0])
    return norms.index_add_(1, block.expert_of, act.pow(2)).sqrt()


def test_activations_init_fits_routers_that_pick_the_tokens_largest_experts():
    _, model, handle = _dense_and_routed(expert_size=8, router_init="activations", router_lr_scale=10.0)
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[:, 24:] = 0  # padding: left out of the fit
    inputs = []
    hooks = [b.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in handle.blocks]
    assert handle.fit_routers([{"input_ids": ids, "attention_mask": mask, "labels": ids}]) == 8 * 24
    assert handle.stage == "soft"  # left as it was
    for hook in hooks:
        hook.remove()
    for block, x in zip(handle.blocks, inputs):  # the measured forward was the dense model's (every expert on)
        x = x[:, :24].reshape(-1, x.shape[-1])
        norms = _expert_norms(block, x)
        top_half = norms >= norms.median(-1, keepdim=True).values
        selected = block.router(x) > handle.config.threshold
        assert 0.35 < selected.float().mean() < 0.65
        assert (selected == top_half).float().mean() > 0.68  # chance: 0.5; measured 0.74-0.76


def test_trainer_fits_activations_routers_before_the_first_step(tmp_path):
    model = build("llama")
    data = [{"input_ids": ids, "labels": ids} for ids in batch(seed=3, size=8, length=16)]
    args = transformers.TrainingArguments(
        str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=0.0, report_to=[], use_cpu=True
    )
    lte = LTECallback({"expert_size": 16, "router_init": "activations", "calibration_batches": 1, **NO_LOSSES})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[lte])
    assert all(torch.count_nonzero(b.router.weight) == 0 for b in lte.handle.blocks)  # open until fitted
    trainer.train()
    fresh = build("llama")
    expected = apply_lte(fresh, lte.config)  # the same fit by hand on the first batch (lr 0: nothing moved)
    expected.fit_routers([{"input_ids": torch.stack([d["input_ids"] for d in data[:4]])}])
    for fitted, by_hand in zip(lte.handle.blocks, expected.blocks):
        assert torch.count_nonzero(fitted.router.weight) > 0
        torch.testing.assert_close(fitted.router.weight, by_hand.router.weight, rtol=1e-4, atol=1e-6)


def _lte_trainer(output_dir, steps: int = 6, lte=None, **args):
    """A tiny llama under LTECallback: stage 1 for half the steps, a checkpoint every 2 steps."""
    model = build("llama")
    data = [{"input_ids": ids, "labels": ids} for ids in batch(seed=3, size=12, length=16)]
    args = transformers.TrainingArguments(
        str(output_dir),
        **{
            "max_steps": steps,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 2,
            "report_to": [],
            "use_cpu": True,
            "disable_tqdm": True,
            **args,
        },
    )
    callback = LTECallback(lte or {"expert_size": 16, "soft_fraction": 0.5})
    return model, callback, transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])


def _routers(handle):
    return [b.router.weight.detach().clone() for b in handle.blocks], [b.expert_of.clone() for b in handle.blocks]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps (stage 2 from step 3), checkpoints at 2, 4 and 6: the final routers, logits and per-step losses."""
    out = tmp_path_factory.mktemp("lte_full")
    model, lte, trainer = _lte_trainer(out)
    trainer.train()
    model.eval()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return out, _routers(lte.handle), model(batch()).logits.detach(), losses


@pytest.mark.parametrize("step", [2, 4])  # resumed in stage 1 (routers still training), and in stage 2
def test_a_resumed_run_continues_with_the_checkpoints_routers(uninterrupted, tmp_path, step):
    """Resumed from a copy of a checkpoint into another folder: the routers, logits and losses of the
    uninterrupted run (a re-initialised router would differ from the first resumed step on)."""
    full, (routers, orders), logits, losses = uninterrupted
    checkpoint = shutil.copytree(full / f"checkpoint-{step}", tmp_path / "saved" / f"checkpoint-{step}")
    model, lte, trainer = _lte_trainer(tmp_path / "out")
    fresh = _routers(lte.handle)[0]
    optimizer_params = []
    trainer.add_callback(_OptimizerParams(optimizer_params))
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert not all(torch.equal(a, b) for a, b in zip(fresh, routers))  # the check below could fail
    got_routers, got_orders = _routers(lte.handle)
    assert all(torch.equal(a, b) for a, b in zip(got_orders, orders))
    for got, want in zip(got_routers, routers):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    router_ids = {id(b.router.weight) for b in lte.handle.blocks}
    assert router_ids <= set(optimizer_params)  # the optimizer (and its loaded state) holds these very routers
    assert lte.resumed_from == str(checkpoint)
    assert lte.handle.stage == "hard" and not any(b.router.weight.requires_grad for b in lte.handle.blocks)
    model.eval()
    torch.testing.assert_close(model(batch()).logits, logits, rtol=1e-5, atol=1e-6)
    resumed = [r["loss"] for r in trainer.state.log_history if "loss" in r]  # the checkpoint's rows, then the new ones
    assert len(resumed) == len(losses) == 6 and resumed[step:] == pytest.approx(losses[step:], rel=1e-5)


def test_resume_with_callback_states_restored_by_the_trainer(uninterrupted, tmp_path):
    """``restore_callback_states_from_checkpoint`` rebuilds the callback from its saved state: the new one adopts the
    routed model and restores the routers as well."""
    full, (routers, _), _, _ = uninterrupted
    model, lte, trainer = _lte_trainer(full, restore_callback_states_from_checkpoint=True, save_strategy="no")
    trainer.train(resume_from_checkpoint=True)  # the latest: checkpoint-6, nothing left to train
    rebuilt = next(c for c in trainer.callback_handler.callbacks if isinstance(c, LTECallback))
    assert rebuilt is not lte and rebuilt.handle is lte.handle and rebuilt.resumed_from == str(full / "checkpoint-6")
    assert all(torch.equal(b.router.weight, w) for b, w in zip(lte.handle.blocks, routers))


class _OptimizerParams(transformers.TrainerCallback):
    def __init__(self, out: list):
        self.out = out

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.out.extend(id(p) for group in optimizer.param_groups for p in group["params"])


def test_resume_with_other_lte_settings_is_refused(uninterrupted, tmp_path):
    full = uninterrupted[0]
    _, _, trainer = _lte_trainer(tmp_path, lte={"expert_size": 8, "soft_fraction": 0.5})
    with pytest.raises(LTEConfigError, match=r"expert_size 8 here, 16 in the checkpoint") as err:
        trainer.train(resume_from_checkpoint=str(full / "checkpoint-2"))
    assert "lte_config.json" in str(err.value) and "soft_fraction" not in str(err.value)


def test_resume_from_a_checkpoint_without_routers_is_refused(uninterrupted, tmp_path):
    checkpoint = shutil.copytree(uninterrupted[0] / "checkpoint-2", tmp_path / "checkpoint-2")
    (checkpoint / WEIGHTS_NAME).unlink()
    _, _, trainer = _lte_trainer(tmp_path / "out")
    with pytest.raises(LTEError, match=r"cannot resume at step 2: no lte.safetensors .* would restart from new ones"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


class _Args:
    def __init__(self, world_size, find_unused, checkpointing=False):
        self.world_size, self.ddp_find_unused_parameters = world_size, find_unused
        self.gradient_checkpointing = self.activation_checkpointing = checkpointing
        self.gradient_accumulation_steps, self.output_dir, self.resume_from_checkpoint = 1, "unused", None


class _State:
    global_step, max_steps, stateful_callbacks = 0, 10, {}


@pytest.mark.parametrize(
    ("world_size", "find_unused", "checkpointing", "soft_fraction", "refused"),
    [
        (2, False, False, 0.5, True),
        (2, None, True, 0.5, True),  # the Trainer's default under activation checkpointing is False
        (2, None, False, 0.5, False),  # ... and True without it
        (2, True, True, 0.5, False),
        (2, False, False, 1.0, False),  # never reaches stage 2
        (1, False, False, 0.5, False),
    ],
)
def test_ddp_reaching_stage_two_without_find_unused_parameters_is_refused(
    world_size, find_unused, checkpointing, soft_fraction, refused
):
    model = build("llama")
    lte = LTECallback({"expert_size": 16, "soft_fraction": soft_fraction})
    begin = lambda: lte.on_train_begin(_Args(world_size, find_unused, checkpointing), _State(), None, model=model)  # noqa: E731
    if refused:
        with pytest.raises(LTEError, match=r"2-process run needs ddp_find_unused_parameters=True: the routers are frozen"):
            begin()
    else:
        begin()
        assert lte.handle is not None


# ---- bad input -------------------------------------------------------------------------------------------------


def test_unknown_key_is_named():
    with pytest.raises(LTEConfigError, match=r"unknown LTE config key 'expert_sise' \(value 16\); allowed keys: .*expert_size"):
        LTECallback({"expert_sise": 16})


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.1, "half", True])
def test_threshold_out_of_range_is_refused(value):
    with pytest.raises(LTEConfigError, match=rf"LTE config key 'threshold' has invalid value {value!r}; allowed: "):
        LTEConfig(threshold=value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_router_grad_to_model_takes_a_boolean_only(value):
    with pytest.raises(LTEConfigError, match=r"'router_grad_to_model' has invalid value .*; allowed: true or false"):
        LTEConfig(router_grad_to_model=value)


def test_expert_size_that_does_not_divide_the_mlp_is_refused_before_anything_changes():
    model = build("llama")  # MLP width 96
    with pytest.raises(
        LTEConfigError,
        match=r"'expert_size' has invalid value 36: model.layers.0.mlp has 96 neurons, not a multiple of 36; allowed: a divisor of 96 \(1, 2, 3,",
    ):
        apply_lte(model, {"expert_size": 36})
    mlp = model.model.layers[0].mlp
    assert not hasattr(mlp, ROUTER_ATTR) and "forward" not in mlp.__dict__
    apply_lte(model, {"expert_size": 32})


@pytest.mark.parametrize("family", ["gpt2", "opt", "nemotron"])
def test_a_model_without_a_gated_mlp_is_refused(family):
    with pytest.raises(
        LTEError, match=rf"model_type '{family}' .* cannot use LTE: its MLP .* is not gated; LTE routes gated MLPs"
    ):
        apply_lte(build(family), {"expert_size": 16})


def test_an_unregistered_architecture_and_a_second_apply_are_refused():
    model = build("llama")
    model.config.model_type = "mamba"
    with pytest.raises(LTEError, match=r"model_type 'mamba' \(LlamaForCausalLM\) is not supported by LTE; supported: .*llama"):
        apply_lte(model)
    model = build("llama")
    apply_lte(model, {"expert_size": 16})
    with pytest.raises(LTEError, match="already routed by LTE"):
        apply_lte(model, {"expert_size": 16})


def test_dense_layers_outside_the_model_are_refused():
    with pytest.raises(
        LTEConfigError, match=r"'dense_layers' has invalid value \[2\]: LlamaForCausalLM has 2 layers; allowed: -2..1"
    ):
        apply_lte(build("llama"), {"expert_size": 16, "dense_layers": [2]})
    handle = apply_lte(build("llama"), {"expert_size": 16, "dense_layers": [-1]})
    assert [b.name for b in handle.blocks] == ["model.layers.0.mlp"]


def test_load_lte_checks_its_files_before_touching_the_model(tmp_path):
    model = build("llama")
    with pytest.raises(LTEError, match=f"{CONFIG_NAME} not found"):
        load_lte(model, tmp_path)
    _, routed, handle = _dense_and_routed()
    handle.save(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["config"]["threshold"] = 2
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(
        LTEConfigError, match=r"lte_config.json: LTE config key 'threshold' has invalid value 2; allowed: a number in \(0, 1\)"
    ):
        load_lte(model, tmp_path)
    meta["config"]["threshold"] = 0.5
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    wider = build("llama", intermediate_size=128)
    with pytest.raises(LTEError, match="does not fit model.layers.0.mlp"):
        load_lte(wider, tmp_path)
    assert not hasattr(model.model.layers[0].mlp, ROUTER_ATTR) and not hasattr(wider.model.layers[0].mlp, ROUTER_ATTR)


def test_lora_wrapped_model_routes_and_trains_its_routers(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    handle = apply_lte(model, {"expert_size": 16})
    model.train()
    ids = batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(b.router.weight.grad is not None for b in handle.blocks)
    assert model.base_model.model.model.layers[0].mlp.gate_proj.lora_B.default.weight.grad is not None
    model.save_pretrained(tmp_path)  # the adapter only: no router inside
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if ROUTER_ATTR in k]
