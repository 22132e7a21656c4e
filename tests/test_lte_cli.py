"""`sat-train cpt|sft` with an `lte:` section: the section's validation (one line, before the model loads), a run on
the tiny base (routers in the report, files beside the final model that `load_lte` installs), LoRA (routers train,
the base stays frozen), `--compare-dense`, and scripts/lte_quality.py with its training-free baselines."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file
from tiny import build

from sat_trainer import LTEConfig, apply_lte, load_lte
from sat_trainer.app.cli import main
from sat_trainer.app.data.sft import PadCollator
from sat_trainer.app.model_source import check_model
from sat_trainer.errors import SATConfigError
from sat_trainer.lte.baselines import RandomExperts, TopKExperts, TopKMask
from sat_trainer.lte.measure import ActiveMeter
from sat_trainer.lte.model import CONFIG_NAME, WEIGHTS_NAME

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs" / "demo_lte_sft.yaml"
TINY_SETS = [
    "training.eval_steps=2",
    "training.logging_steps=1",
    "training.per_device_train_batch_size=2",
    "data.max_length=32",
    "data.max_train_samples=40",
    "data.max_eval_samples=4",
]


def _argv(base: Path, out: Path, *extra: str, steps: int = 4) -> list[str]:
    """`sat-train sft` of the LTE demo config on the tiny base, in seconds (4 experts of 16 neurons per MLP)."""
    sets = [f"model={base}", f"training.output_dir={out}", f"training.max_steps={steps}", *TINY_SETS, *extra]
    return ["sft", "--config", str(CONFIG), *(a for s in sets for a in ("--set", s))]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the lte: section is validated before anything loads --------------------------------------------------------


def _scenario(base: Path, out: Path, changes: dict) -> dict:
    raw = yaml.safe_load(CONFIG.read_text())
    raw["model"] = str(base)
    raw["training"]["output_dir"] = str(out)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    return raw


BAD = [
    (
        "unknown-key",
        {"lte.expert_sise": 16},
        "unknown LTE config key 'expert_sise' (value 16); allowed keys: calibration_batches",
    ),
    ("threshold", {"lte.threshold": 1.0}, "LTE config key 'threshold' has invalid value 1.0; allowed: a number in (0, 1)"),
    (
        "soft-fraction",
        {"lte.soft_fraction": 1.5},
        "LTE config key 'soft_fraction' has invalid value 1.5; allowed: a number in [0, 1]",
    ),
    (
        "router-init",
        {"lte.router_init": "uniform"},
        "LTE config key 'router_init' has invalid value 'uniform'; allowed: normal, zeros, open, activations",
    ),
    ("not-a-mapping", {"lte": 5}, "LTE config must be a mapping of keys to values, got int"),
    ("expert-size", {"lte.expert_size": 24}, "key 'lte.expert_size' has invalid value 24: the MLPs of {base} have 64 neurons"),
    ("dense-layers-outside", {"lte.dense_layers": [2]}, "key 'lte.dense_layers' has invalid value [2]: {base} has 2 layers"),
    ("dense-layers-all", {"lte.dense_layers": [0, -1]}, "it names all 2 layers of {base}, so LTE would route nothing"),
    ("with-sat", {"sat": {"omission_rate": 0.5}}, "sections 'sat' and 'lte' cannot be combined: both rewrite the same MLPs"),
    ("bert", {"model": "{files}/bert"}, "model_type 'bert' of {files}/bert is not supported by LTE"),
    ("not-gated", {"model": "{files}/gpt2"}, "model_type 'gpt2' of {files}/gpt2 cannot use LTE: its MLP is not gated"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Model folders LTE cannot route (a config.json only: nothing to load beyond it)."""
    folder = tmp_path_factory.mktemp("lte_bad")
    for model_type in ("bert", "gpt2"):
        (folder / model_type).mkdir()
        (folder / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_a_bad_lte_section_is_one_line_before_the_model_loads(case, tiny_base, files, tmp_path, capsys):
    name, changes, expected = case
    fill = {"{base}": str(tiny_base), "{files}": str(files)}

    def filled(value):
        for key, path in fill.items():
            value = value.replace(key, path) if isinstance(value, str) else value
        return value

    out = tmp_path / "out"
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_scenario(tiny_base, out, {k: filled(v) for k, v in changes.items()})))
    assert main(["sft", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("sat-train: error:")]
    assert len(errors) == 1 and filled(expected) in errors[0], captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out and "'loss'" not in captured.out
    assert not out.exists()  # nothing trained, no run folder


def test_a_bad_lte_key_is_refused_before_torch_is_imported(tmp_path):
    (tmp_path / "bad.yaml").write_text(CONFIG.read_text() + "  thresold: 0.4\n")
    code = (
        "import sys\nfrom sat_trainer.app.cli import main\n"
        f"assert main(['sft', '--config', {str(tmp_path / 'bad.yaml')!r}]) == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "unknown LTE config key 'thresold'" in proc.stderr


def test_the_run_time_check_refuses_an_expert_size_that_does_not_divide_the_mlp(tiny_base):
    """What a builtin or hub model (no config.json to read at config time) gets: AutoConfig, before weights load."""
    with pytest.raises(SATConfigError, match=r"key 'lte\.expert_size' has invalid value 24: the MLPs of .* have 64 neurons"):
        check_model(str(tiny_base), sat=None, lora=None, max_length=32, lte=LTEConfig(expert_size=24))
    check_model(str(tiny_base), sat=None, lora=None, max_length=32, lte=LTEConfig(expert_size=16))


# ---- a run -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lte_run(tiny_base, tmp_path_factory) -> tuple[Path, str]:
    """(the run folder, what the run printed) of a 4-step run: 2 steps soft, 2 hard, a checkpoint every 2."""
    out = tmp_path_factory.mktemp("lte_run") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(_argv(tiny_base, out, "training.save_steps=2")) == 0
    return out, printed.getvalue()


def test_an_lte_run_reports_the_neurons_computed_per_layer_and_writes_its_files(lte_run):
    lte_run, printed = lte_run
    report = json.loads((lte_run / "report.json").read_text())
    assert report["mode"] == "lte" and report["steps"] == 4 and report["config"]["lte"]["expert_size"] == 16
    lte = report["lte"]
    assert lte["stage"] == "hard" and lte["threshold"] == 0.5 and set(lte["held_out"]) == {"chat"}
    chat = lte["held_out"]["chat"]
    assert chat["loss"] == report["held_out_loss"]["chat"]  # the report's held-out loss: the hard stage's, whole set
    assert set(chat["layers"]) == {"0", "1"} and all(0 <= f <= 1 for f in chat["layers"].values())
    assert chat["mlp_fraction"] == pytest.approx(sum(chat["layers"].values()) / 2)  # equal widths: the layers' mean
    assert chat["tokens"] > 0
    assert {WEIGHTS_NAME, CONFIG_NAME, "model.safetensors", "config.json"} <= {p.name for p in (lte_run / "final").iterdir()}


def test_the_console_prints_the_sparsity_per_layer(lte_run):
    out, printed = lte_run
    lte = json.loads((out / "report.json").read_text())["lte"]["held_out"]["chat"]
    assert f"{100 * lte['mlp_fraction']:.1f}% of MLP neurons computed per token" in printed
    assert f"held-out loss {lte['loss']:.4f}" in printed
    assert f"per layer (fraction computed; 1 = no router): 0: {lte['layers']['0']:.3f}, 1: {lte['layers']['1']:.3f}" in printed


def test_the_cpt_scenario_takes_an_lte_section_in_place_of_sat(tiny_base, tmp_path):
    """`sat-train cpt` of the shipped CPT demo with ``sat: null`` and an ``lte:`` section: both stages run on the
    packed text, and the saved routers reload onto the plain final model at the reported sparsity."""
    out = tmp_path / "cpt"
    sets = [f"model={tiny_base}", f"training.output_dir={out}", "training.max_steps=4", *TINY_SETS, "sat=null"]
    sets.append("lte={expert_size: 16, router_init: activations, soft_fraction: 0.5}")
    assert main(["cpt", "--config", str(ROOT / "configs" / "demo_cpt.yaml"), *(a for s in sets for a in ("--set", s))]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "lte" and report["steps"] == 4 and set(report["lte"]["held_out"]) == {"continual", "base"}
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    handle = load_lte(model, out / "final")
    assert handle.stage == "hard" and len(handle.blocks) == 2
    fraction = report["lte"]["held_out"]["continual"]["mlp_fraction"]
    assert 0 < fraction < 1


def test_the_saved_routers_reload_with_load_lte_and_give_the_reported_sparsity(lte_run):
    """load_lte on the plain final model: same routed layers, and on the run's held-out set (one eval batch, so the
    Trainer's loss is the token mean too) the reported loss and fraction of neurons."""
    lte_run, _ = lte_run
    quality = _load_script("lte_quality")
    final = lte_run / "final"
    model = transformers.AutoModelForCausalLM.from_pretrained(final)
    handle = load_lte(model, final)
    assert handle.stage == "hard" and [b.router.weight.shape for b in handle.blocks] == [torch.Size([4, 32])] * 2
    sets, collator, batch_size = quality.eval_data(lte_run)
    with ActiveMeter(model, handle) as meter:
        loss = quality.held_out_loss(model, sets, collator, batch_size)
    reported = json.loads((lte_run / "report.json").read_text())["lte"]["held_out"]["chat"]
    assert loss["chat"] == pytest.approx(reported["loss"], rel=1e-5)
    assert meter.summary()["mlp_fraction"] == pytest.approx(reported["mlp_fraction"], abs=1e-6)
    assert meter.summary()["tokens"] == reported["tokens"]


def test_the_expert_floor_script_groups_and_fits_on_calibration_records_and_measures_on_the_rest(lte_run):
    """scripts/lte_expert_floor.py on a run's final model: every row (dense too) is measured on the held-out records
    after the first one, and the co-activation row is the oracle over groups of the first record's activations."""
    lte_run, _ = lte_run
    floor, quality = _load_script("lte_expert_floor"), _load_script("lte_quality")
    with pytest.raises(SystemExit, match="calibration-records"):
        floor.main([str(lte_run), "--fitted-router"])
    argv = [str(lte_run), "--expert-sizes", "1", "16", "--calibration-records", "1", "--grouping", "weights", "coactivation"]
    rows = floor.main([*argv, "--fitted-router"])
    assert [(r["expert_size"], r.get("router")) for r in rows] == [
        (None, None),
        (1, "top-k"),
        (1, "fitted"),
        (16, "oracle, weights"),
        (16, "oracle, coactivation"),
        (16, "fitted"),
    ]
    sets, collator, batch_size = quality.eval_data(lte_run)
    first, rest = floor.split_sets(sets, 1)
    model = quality.load_model(lte_run / "final")
    assert rows[0]["held_out_loss"] == quality.held_out_loss(model, rest, collator, batch_size)
    profiles = floor.activation_profiles(model, floor.batches_of(first, collator, batch_size))
    with TopKExperts(model, 0.5, expert_size=16, features=profiles):
        assert rows[4]["held_out_loss"] == quality.held_out_loss(model, rest, collator, batch_size)
    assert rows[3]["held_out_loss"] != rows[4]["held_out_loss"]
    assert all(0 < r["fraction"] < 1 for r in rows[1:])


def test_a_run_resumed_from_a_checkpoint_ends_with_the_uninterrupted_runs_routers(lte_run, tiny_base, tmp_path):
    lte_run, _ = lte_run
    assert (lte_run / "checkpoint-2" / WEIGHTS_NAME).is_file()
    out = tmp_path / "resumed"
    assert main(_argv(tiny_base, out, "training.save_steps=2", f"training.resume_from_checkpoint={lte_run}/checkpoint-2")) == 0
    uninterrupted, resumed = (load_file(str(folder / "final" / WEIGHTS_NAME)) for folder in (lte_run, out))
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key])
    reports = [json.loads((folder / "report.json").read_text()) for folder in (lte_run, out)]
    assert reports[1]["resumed_from"].endswith("checkpoint-2") and reports[1]["steps"] == 4
    assert reports[1]["held_out_loss"]["chat"] == pytest.approx(reports[0]["held_out_loss"]["chat"], rel=1e-5)


def test_lora_and_lte_train_the_routers_and_leave_the_base_frozen(tiny_base, tmp_path):
    out = tmp_path / "lora"
    assert main(_argv(tiny_base, out, "lora.r=4", "lora.target_modules=[q_proj, v_proj]")) == 0
    final = out / "final"
    saved = load_file(str(final / WEIGHTS_NAME))
    config = LTEConfig.from_dict(json.loads((final / CONFIG_NAME).read_text())["config"])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_base)
    initial = apply_lte(base, config)  # the routers and experts the run started from (same seed, same base weights)
    for block in initial.blocks:
        layer = int(block.name.split(".")[-2])
        assert torch.equal(saved[f"{layer}.order"], torch.argsort(block.expert_of, stable=True))
        assert not torch.equal(saved[f"{layer}.router"], block.router.weight.detach())  # the routers trained
    initial.remove()
    merged = transformers.AutoModelForCausalLM.from_pretrained(final).state_dict()
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, merged[k])]
    assert changed and all(".q_proj." in k or ".v_proj." in k for k in changed)  # LoRA's targets only: the base froze
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and not [k for k in adapter if "lte_router" in k]


# ---- --compare-dense and the quality script -----------------------------------------------------------------------


@pytest.mark.slow
def test_compare_dense_and_the_quality_script(tiny_base, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([*_argv(tiny_base, out), "--compare-dense"]) == 0
    table = capsys.readouterr().out
    assert "| | dense | LTE |" in table and "| MLP neurons computed per token, held-out: chat | 100% |" in table
    dense, lte = (json.loads((out / m / "report.json").read_text()) for m in ("dense", "lte"))
    assert dense["mode"] == "dense" and "lte" not in dense and lte["mode"] == "lte"
    first = [r["held_out"][0] for r in (dense["history"], lte["history"])]
    assert first[0]["step"] == first[1]["step"] == 0  # same data; the LTE run's step 0 is soft (scores weigh the MLPs)
    assert not (out / "dense" / "final" / WEIGHTS_NAME).exists() and (out / "lte" / "final" / WEIGHTS_NAME).is_file()
    assert (out / "compare.md").read_text().startswith("| | dense | LTE |")

    quality = _load_script("lte_quality")
    argv = [str(out), "--thresholds", "0.3", "0.5", "--fractions", "1.0", "0.5"]
    rows = quality.main(
        [*argv, "--json", str(tmp_path / "rows.json"), "--markdown", str(tmp_path / "t.md"), "--plot", str(tmp_path / "q.png")]
    )
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    assert [r["threshold"] for r in by["lte"]] == [0.3, 0.5] and by["dense"][0]["model"] == "dense"
    assert by["lte"][1]["held_out_loss"]["chat"] == pytest.approx(lte["held_out_loss"]["chat"], rel=1e-5)
    assert by["lte"][1]["fraction"] == pytest.approx(lte["lte"]["held_out"]["chat"]["routed_fraction"], abs=1e-6)
    full = [r for r in by["top-k"] if r["target_fraction"] == 1.0]
    assert full[0]["held_out_loss"] == by["dense"][0]["held_out_loss"]  # top-k of every neuron: dense, exactly
    assert all(r["model"] == "dense" for r in by["top-k"] + by["random"])
    assert {r["target_fraction"] for r in by["random"]} >= {0.5, 1.0}
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    assert (tmp_path / "t.md").read_text().startswith("| method | model |") and (tmp_path / "q.png").stat().st_size > 5_000


# ---- the baselines' masks ------------------------------------------------------------------------------------------


def _records(count: int = 5) -> list[dict]:
    """SFT-like records of several lengths (padded in a batch), labels on their second half."""
    generator = torch.Generator().manual_seed(3)
    records = []
    for i in range(count):
        ids = torch.randint(0, 64, (8 + 3 * i,), generator=generator).tolist()
        records.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2 :]})
    return records


def _down_inputs(model) -> tuple[list, list[torch.Tensor]]:
    """Pre-hooks capturing each MLP's ``down`` input (registered now: they run before any registered later)."""
    seen: list[torch.Tensor] = []
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        for layer in model.model.layers
    ]
    return hooks, seen


def test_top_k_of_every_neuron_is_the_dense_loss_and_lower_fractions_keep_k_per_token():
    quality = _load_script("lte_quality")
    model = build("llama").eval()
    sets, collator = {"held": _records()}, PadCollator(0)
    dense = quality.held_out_loss(model, sets, collator, batch_size=2)
    with TopKMask(model, 1.0) as mask:
        assert quality.held_out_loss(model, sets, collator, batch_size=2) == dense  # bit for bit
    assert mask.kept_fraction() == 1.0
    width = model.model.layers[0].mlp.down_proj.in_features
    for fraction in (0.5, 0.25):
        k = round(fraction * width)
        raw_hooks, raw = _down_inputs(model)
        with TopKMask(model, fraction) as mask:
            kept_hooks, kept = _down_inputs(model)
            loss = quality.held_out_loss(model, sets, collator, batch_size=2)
        for hook in raw_hooks + kept_hooks:
            hook.remove()
        assert loss["held"] != dense["held"] and mask.kept_fraction() == k / width
        for h, masked in zip(raw, kept):
            on = masked != 0
            assert (on.sum(-1) == k).all()  # exactly k neurons per token, padding included
            assert torch.equal(masked[on], h[on])  # kept ones unchanged
            smallest_kept = h.abs().masked_fill(~on, float("inf")).amin(-1)
            largest_dropped = h.abs().masked_fill(on, -1.0).amax(-1)
            assert (smallest_kept >= largest_dropped).all()  # the largest |act(gate) * up| of each token


def _masked_forward(model, mask):
    """One forward of a random batch under ``mask``: (mask, each MLP's ``down`` input before the mask, after it)."""
    raw_hooks, raw = _down_inputs(model)
    with mask:
        kept_hooks, kept = _down_inputs(model)
        with torch.no_grad():
            model(torch.randint(0, 64, (2, 12)))
    for hook in raw_hooks + kept_hooks:
        hook.remove()
    return mask, raw, kept


def test_random_experts_keep_whole_experts_at_the_fraction():
    model = build("llama").eval()
    width = model.model.layers[0].mlp.down_proj.in_features
    size, experts = 16, width // 16
    mask, raw, kept = _masked_forward(model, RandomExperts(model, 0.5, expert_size=size, seed=1))
    k = round(0.5 * experts)
    assert mask.kept_fraction() == k / experts
    for (name, shape, block), (expert_of, kept_k), h, masked in zip(mask.blocks, mask.states, raw, kept):
        on = (masked != 0).reshape(-1, width)
        assert kept_k == k and (on.sum(-1) == k * size).all()
        per_expert = torch.zeros(on.shape[0], experts).index_add_(1, expert_of, on.float())
        assert ((per_expert == 0) | (per_expert == size)).all()  # whole experts: every neuron of a kept one
        assert torch.equal(masked.reshape(-1, width)[on], h.reshape(-1, width)[on])


def test_top_k_experts_keep_each_tokens_largest_experts_of_ltes_grouping():
    model = build("llama").eval()
    width = model.model.layers[0].mlp.down_proj.in_features
    size, experts = 16, width // 16
    grouping = apply_lte(build("llama"), {"expert_size": size})  # the same weights: apply_lte's experts
    mask, raw, kept = _masked_forward(model, TopKExperts(model, 0.5, expert_size=size))
    k = round(0.5 * experts)
    assert mask.kept_fraction() == k / experts
    for (expert_of, kept_k), routed, h, masked in zip(mask.states, grouping.blocks, raw, kept):
        assert torch.equal(expert_of, routed.expert_of) and kept_k == k
        h, on = h.reshape(-1, width), (masked != 0).reshape(-1, width)
        norms = torch.zeros(h.shape[0], experts).index_add_(1, expert_of, h.pow(2))
        chosen = torch.zeros(h.shape[0], experts).index_add_(1, expert_of, on.float()) > 0
        assert (chosen.sum(-1) == k).all()
        smallest_kept = norms.masked_fill(~chosen, float("inf")).amin(-1)
        largest_dropped = norms.masked_fill(chosen, -1.0).amax(-1)
        assert (smallest_kept >= largest_dropped).all()  # the k experts of largest norm, whole
    with TopKExperts(model, 1.0, expert_size=size):
        with torch.no_grad():
            every = model(torch.arange(12)[None]).logits
    with torch.no_grad():
        torch.testing.assert_close(every, model(torch.arange(12)[None]).logits, rtol=0, atol=0)


def test_the_meter_counts_selected_neurons_per_real_token_and_unrouted_layers_whole():
    """Against the routers' scores computed by hand: padding left out, a dense layer counted at 1."""
    model = build("llama").eval()
    handle = apply_lte(model, {"expert_size": 16, "dense_layers": [0]})
    handle.set_stage("hard")
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[1].mlp.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    with ActiveMeter(model, handle) as meter, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    selected = (torch.sigmoid(inputs[0] @ handle.blocks[0].router.weight.t()) > 0.5).float().mean(-1)
    expected = float(selected[mask.bool()].mean())
    summary = meter.summary()
    assert summary["tokens"] == 16 and summary["layers"][0] == 1.0
    assert summary["layers"][1] == pytest.approx(expected) and summary["routed_fraction"] == pytest.approx(expected)
    assert summary["mlp_fraction"] == pytest.approx((1 + expected) / 2)
    assert 0 < expected < 1  # some experts on, some off: the count can tell them apart
