"""Tiny models of every supported family, built from configs (never from the hub)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

from sat_trainer import SATConfig

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
        vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
    ),
}
LLAMA_STYLE_ATTENTION = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]


def build(family: str = "llama", attn_implementation: str = "eager", seed: int = 0, **overrides) -> nn.Module:
    """A randomly initialised tiny causal LM of ``family`` in fp32."""
    config = FAMILY_CONFIGS[family]()
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


def sat_config(**kwargs) -> SATConfig:
    """A SATConfig that omits attention groups as well as MLP channels (the package default is
    MLP only), so every test that does not choose its targets covers both kinds of block."""
    return SATConfig(**{"targets": ["mlp", "attention"], **kwargs})


def demo_run_args(task: str, base, out, steps: int = 4, *extra: str) -> list[str]:
    """`sat-train <task>` arguments that run the shipped demo config in seconds on a tiny base."""
    sets = [
        f"model={base}", f"training.output_dir={out}", f"training.max_steps={steps}", "training.eval_steps=2",
        "training.logging_steps=1", "training.per_device_train_batch_size=2", "data.max_length=32",
        "data.max_train_samples=40", "data.max_eval_samples=4", *extra,
    ]
    return [task, "--config", f"configs/demo_{task}.yaml", *(a for s in sets for a in ("--set", s))]


def sparse(model: nn.Module, rate: float = 0.5, **kwargs):
    """Patch ``model`` (both targets unless told), set ``rate`` in training mode and start a draw."""
    from sat_trainer import apply_sat

    handle = apply_sat(model, sat_config(omission_rate=rate, **kwargs))
    model.train()
    handle.set_rate(rate)
    handle.new_step()
    return handle
