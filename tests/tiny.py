"""Tiny models of every supported family, built from configs (never from the hub)."""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn

from sat_trainer import SATConfig, apply_sat

VOCAB = 96

_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=16,
    max_position_embeddings=64,
)

FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_LLAMA_LIKE, attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE),
    "gemma": lambda: transformers.GemmaConfig(**_LLAMA_LIKE),
    "gemma2": lambda: transformers.Gemma2Config(
        **_LLAMA_LIKE, sliding_window=8, attn_logit_softcapping=30.0, final_logit_softcapping=20.0
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**_LLAMA_LIKE, sliding_window=8),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
    ),
}
LLAMA_STYLE_ATTENTION = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


def _llama_like(model_type: str, **extra):
    """The tiny Llama-like config of any registered ``model_type`` (its own config class, defaults
    elsewhere; dropout off so the sliced and the reference forward see the same activations)."""

    def make():
        config = transformers.AutoConfig.for_model(model_type, **{**_LLAMA_LIKE, **extra})
        for key in (
            "attention_dropout",
            "hidden_dropout",
            "residual_dropout",
            "embedding_dropout",
            "mlp_dropout",
            "resid_pdrop",
            "embd_pdrop",
        ):
            if isinstance(getattr(config, key, None), (int, float)):
                setattr(config, key, 0.0)
        if (getattr(config, "pad_token_id", None) or 0) >= VOCAB:  # e.g. Phi-3's 32000: outside the tiny vocabulary
            config.pad_token_id = 0
        return config

    return make


# Families added after the first nine: one generic tiny config each, tested by every registry entry's
# exactness test (tests/test_exactness.py::test_every_registered_family_matches_masked_reference).
# Each enables the options that make its blocks differ from Llama's (biases, partial rotary, q/k norms).
MORE_FAMILIES = {
    "apertus": _llama_like("apertus"),
    "apertus1p5_text": _llama_like("apertus1p5_text"),
    "arcee": _llama_like("arcee"),
    "cohere": _llama_like("cohere"),
    "cohere2": _llama_like("cohere2", sliding_window=8),
    "cwm": _llama_like("cwm"),
    "diffllama": _llama_like("diffllama"),
    "ernie4_5": _llama_like("ernie4_5", use_bias=True),
    "exaone4": _llama_like("exaone4", sliding_window=8),
    "glm": _llama_like("glm", attention_bias=True),
    "glm4": _llama_like("glm4", attention_bias=True),
    "granite": _llama_like("granite", attention_bias=True, mlp_bias=True),
    "granite_swa": _llama_like("granite_swa"),
    "helium": _llama_like("helium", head_dim=8),  # its o_proj reads hidden_size features: heads * head_dim must match
    "hunyuan_v1_dense": _llama_like("hunyuan_v1_dense", use_qk_norm=True),
    "hyperclovax": _llama_like("hyperclovax"),
    "jais2": _llama_like("jais2"),
    "ministral": _llama_like("ministral"),
    "ministral3": _llama_like("ministral3"),
    "nanochat": _llama_like("nanochat"),
    "nemotron": _llama_like("nemotron", partial_rotary_factor=0.5),
    "olmo": _llama_like("olmo", clip_qkv=2.0),
    "olmo2": _llama_like("olmo2"),
    "olmo3": _llama_like("olmo3"),
    "phi": _llama_like("phi", qk_layernorm=True, head_dim=8),
    "phi3": _llama_like("phi3"),
    "seed_oss": _llama_like("seed_oss", attention_bias=True),
    "smollm3": _llama_like("smollm3"),
    "stablelm": _llama_like("stablelm", head_dim=8, use_qkv_bias=True),
    "starcoder2": _llama_like("starcoder2"),
    "vaultgemma": _llama_like("vaultgemma"),
}
NO_SDPA = {"gemma2", "vaultgemma"}  # transformers has no sdpa path for them (attention soft-capping / eager only)
ALL_FAMILY_CONFIGS = {**FAMILY_CONFIGS, **MORE_FAMILIES}


class CountingStream(torch.utils.data.Dataset):
    """A learnable fixed stream for Trainer runs: each row counts up from a random start (mod vocab); the first
    ``prompt`` tokens of every row are labelled -100, as an SFT prompt."""

    def __init__(self, rows: int = 64, length: int = 16, prompt: int = 0):
        starts = torch.randint(0, VOCAB, (rows, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % VOCAB
        self.labels = self.ids.clone()
        self.labels[:, :prompt] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def build(family: str = "llama", attn_implementation: str = "eager", seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny causal LM of ``family`` in fp32."""
    config = ALL_FAMILY_CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).float()


def batch(seed: int = 1, size: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def leave_process_group() -> None:
    """End a distributed test worker: meet the other ranks, then exit without tearing gloo down.

    ``destroy_process_group`` (or interpreter exit) with gloo on CPU occasionally aborts a rank
    ("terminate called without an active exception") while the peer's threads are still closing;
    the worker's results are already on disk by then, so skipping teardown loses nothing.
    """
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# The paper's SAT, the package default until 2026-12-05: the tests were written for it and say so when they
# test another mode, schedule or dense start.
PAPER_SAT = {"omission_rate": 0.25, "omit_in": "forward_backward", "schedule": "ladder", "dense_warmup_fraction": 0.0}


def sat_config(**kwargs) -> SATConfig:
    """A SATConfig that omits attention groups as well as MLP channels (the package default is
    MLP only), so every test that does not choose its targets covers both kinds of block, with
    :data:`PAPER_SAT`'s mode and schedule unless told otherwise."""
    return SATConfig(**{"targets": ["mlp", "attention"], **PAPER_SAT, **kwargs})


def eager_and_compiled_steps(base: nn.Module, config: SATConfig, rate: float, steps: int = 3) -> list[list[tuple]]:
    """Two runs of ``steps`` SAT steps on copies of ``base`` at ``rate``, eager then under
    ``torch.compile`` (backend eager), each step a new draw on batch ``seed=step``: per run, per
    step, ``(loss, every parameter's gradient, the handle's kept sets)``."""
    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = copy.deepcopy(base)
        handle = apply_sat(model, config)
        forward = torch.compile(model, backend="eager") if compiled else model
        model.train()
        handle.set_rate(rate)
        run = []
        for step in range(steps):
            handle.new_step()
            model.zero_grad(set_to_none=True)
            loss = forward(input_ids=batch(seed=step), labels=batch(seed=step)).loss
            loss.backward()
            run.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, handle.kept()))
        runs.append(run)
    return runs


def demo_run_args(task: str, base, out, steps: int = 4, *extra: str) -> list[str]:
    """`sat-train <task>` arguments that run the shipped demo config in seconds on a tiny base."""
    sets = [
        f"model={base}",
        f"training.output_dir={out}",
        f"training.max_steps={steps}",
        "training.eval_steps=2",
        "training.logging_steps=1",
        "training.per_device_train_batch_size=2",
        "data.max_length=32",
        "data.max_train_samples=40",
        "data.max_eval_samples=4",
        *extra,
    ]
    return [task, "--config", f"configs/demo_{task}.yaml", *(a for s in sets for a in ("--set", s))]


def sparse(model: nn.Module, rate: float = 0.5, **kwargs):
    """Patch ``model`` (both targets unless told), set ``rate`` in training mode and start a draw."""
    handle = apply_sat(model, sat_config(omission_rate=rate, **kwargs))
    model.train()
    handle.set_rate(rate)
    handle.new_step()
    return handle
