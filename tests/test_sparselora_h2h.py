"""scripts/sparselora_port.py: the stand-ins for SparseLoRA's GPU-only pieces, and SparseLoRA's own MLP run through them.

The tests that import SparseLoRA's code need its source (a git mirror or checkout of z-lab/sparselora) at
``$SPARSELORA_SRC``; without it they skip. The stand-ins' own checks need nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPTS = Path(__file__).parent.parent / "scripts"
SOURCE = Path(os.environ.get("SPARSELORA_SRC", "/work/.mirror/z-lab+sparselora/repo"))


def _port():
    spec = importlib.util.spec_from_file_location("sparselora_port", SCRIPTS / "sparselora_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_ratios_keep_the_first_three_and_the_last_layer_dense_at_another_depth():
    config = {"sparsity": {}}
    for i in range(32):  # llama3-8b-math10k.yaml's MLP pattern
        config["sparsity"][f"layers.{i}.mlp"] = 0.99 if 3 <= i <= 30 else 0
        config["sparsity"][f"layers.{i}.self_attn"] = 0.75 if i in (14, 20) else 0
    mlp, attention = _port().shipped_ratios(config, 30)
    assert [i for i, r in enumerate(mlp) if r == 0] == [0, 1, 2, 29]
    assert set(mlp[3:29]) == {0.99} and len(attention) == 30
    assert _port().shipped_ratios(config, 32)[0] == [config["sparsity"][f"layers.{i}.mlp"] for i in range(32)]


def test_swiglu_stand_ins_match_autograd():
    port = _port()
    torch.manual_seed(0)
    e, g, dh = torch.randn(3, 5, 7, dtype=torch.float64).unbind(0)
    e_ref, g_ref = e.clone().requires_grad_(), g.clone().requires_grad_()
    h_ref = F.silu(e_ref) * g_ref
    h_ref.backward(dh)
    h, dg, de = port._swiglu_backward(dh, e, g)
    assert torch.allclose(port._swiglu_forward(e, g), h_ref) and torch.allclose(h, h_ref)
    assert torch.allclose(dg, g_ref.grad) and torch.allclose(de, e_ref.grad)


@pytest.fixture
def spft(tmp_path):
    """SparseLoRA's modules imported from $SPARSELORA_SRC; the process's modules, path and peft put back after."""
    if not SOURCE.exists():
        pytest.skip(f"SparseLoRA's source not found at {SOURCE} (set SPARSELORA_SRC)")
    import peft
    import transformers.models.llama.modeling_llama as llama

    modules, path = set(sys.modules), list(sys.path)
    forward, had_flash = peft.tuners.lora.layer.Linear.forward, hasattr(llama, "LlamaFlashAttention2")
    port = _port()
    try:
        loaded = port.load_spft(SOURCE)
    except ModuleNotFoundError as err:  # its imports (bitsandbytes, ...) are not this package's dependencies
        loaded = None
        reason = f"SparseLoRA's code needs {err.name}, which is not installed"
    if loaded is not None:
        yield port, loaded
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path
    peft.tuners.lora.layer.Linear.forward = forward
    if not had_flash and hasattr(llama, "LlamaFlashAttention2"):
        del llama.LlamaFlashAttention2
    if loaded is None:
        pytest.skip(reason)


def _tiny_lora(targets: list[str]):
    import peft
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=50
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # nonzero adapters, so their path shows in outputs and gradients
    return model


def _sparsify(port, spft, model, targets, tmp_path, ratio=0.5):
    shipped = {"start_step": 0, "mode": "svd_8", "skip_output_tokens": True}
    return port.sparsify(
        spft,
        model,
        shipped=shipped,
        mlp_ratios=[0.0, ratio, 0.0],
        lora_targets=targets,
        predictor_dir=tmp_path,
        model_id="tiny",
        batch_size=2,
        max_length=12,
        padding_side="right",
    )


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 12))
    labels = ids.clone()
    labels[0, :7], labels[1, :5] = -100, -100  # context first, then the response
    return ids, labels


def test_unsloth_mlp_dense_path_equals_peft(spft, tmp_path):
    """With LoRA on the MLP, SparseLoRA's UnslothSparseLlamaMLP (its own autograd Function, on the unsloth
    stand-ins) with sparsity off equals peft's MLP in output and in every adapter gradient."""
    port, modules = spft
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    reference = _tiny_lora(targets)
    wrapped = _sparsify(port, modules, _tiny_lora(targets), targets, tmp_path)
    wrapped.set_enabled(False)
    ids, labels = _batch()
    for model in (reference, wrapped.model):
        model(input_ids=ids, labels=labels).loss.backward()
    ours = dict(wrapped.model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            assert torch.allclose(ours[name].grad, p.grad, atol=1e-5), name


def test_hf_path_sparse_mlp_equals_the_masked_reference(spft, tmp_path):
    """LoRA on attention only (SparseLoRA's default): at ratio 0.5 the context tokens' MLP output is the MLP with
    only the predicted channels kept, the response band's is dense, as spft/api.py describes."""
    port, modules = spft
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    wrapped = _sparsify(port, modules, _tiny_lora(targets), targets, tmp_path)
    assert wrapped.set_step(0, 10)
    mlp = next(m for m in wrapped.sparse_modules() if m.sparsity > 0)
    x = torch.randn(2, 12, 32)
    masks = torch.zeros(2, 12, dtype=torch.bool)
    masks[:, 5:] = True  # the band from the earliest response start to the end
    kept = mlp.pred_mlp(x)
    assert kept.numel() == 32
    with wrapped.active():
        out = mlp(x, masks=masks)
    h = F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)
    sparse_h = torch.zeros_like(h)
    sparse_h[..., kept] = h[..., kept]
    expected = torch.where(masks[..., None], F.linear(h, mlp.down_proj.weight), F.linear(sparse_h, mlp.down_proj.weight))
    assert torch.allclose(out, expected, atol=1e-5)


def test_hf_path_with_lora_on_the_mlp_fails_in_sparselora_itself(spft, tmp_path):
    """The port's item 3: SparseLoRA's HF path cannot run LoRA on the MLP (why the Unsloth MLP path is used)."""
    port, modules = spft
    model = _tiny_lora(["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"])
    config = _sparsify(port, modules, _tiny_lora(["q_proj"]), ["q_proj"], tmp_path).config
    model = modules.api.get_spft_model(model, config).to(torch.float32)  # the port's item 5
    ids, labels = _batch()
    with pytest.raises(TypeError, match="multiple values for argument 'sparse_indices'"):
        model(input_ids=ids, labels=labels)


def test_sparse_linear_cuts_the_input_gradient_where_an_adapter_follows(spft):
    """The journal's defect 6: on a frozen base, SparseLinear's out_scatter and in_gather modes (the projections
    that carry an adapter) pass no gradient to their input; the out/in modes (no adapter) do."""
    from spft.modules.linear import SparseLinear

    config = type("Config", (), {"sparse_lora_branch": False})()
    kept = torch.tensor([0, 2, 5])
    for mode, width, passes in (("out_scatter", 8, False), ("in_gather", 8, False), ("out", 8, True), ("in", 3, True)):
        base = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
        x = torch.randn(1, 3, width, requires_grad=True)
        assert SparseLinear(base, mode=mode, config=config)(x, sparse_indices=kept).requires_grad == passes, mode
