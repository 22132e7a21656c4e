"""Which model families SAT supports, described by block shape, not by code.

A family is one registry entry: the blocks it has and, for each, the attribute names of its
input projections (output features sliced) and its output projection (input features sliced).
One patcher (:mod:`sat_trainer.patch.units`) serves them all, so adding a Llama-like family is
one line here plus a test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockShape:
    """Where a block's projections live, relative to the block module."""

    kind: str  # "mlp" or "attention"
    inputs: tuple[str, ...]
    output: str
    activation: str | None = None  # MLP: attribute of the activation function applied to the first input's output


GATED_MLP = BlockShape("mlp", ("gate_proj", "up_proj"), "down_proj", "act_fn")
LLAMA_ATTENTION = BlockShape("attention", ("q_proj", "k_proj", "v_proj"), "o_proj")
GPT2_MLP = BlockShape("mlp", ("c_fc",), "c_proj", "act")  # Conv1D, transposed weights
OPT_MLP = BlockShape("mlp", ("fc1",), "fc2", "activation_fn")  # lives on the decoder layer itself

_LLAMA_LIKE = (GATED_MLP, LLAMA_ATTENTION)

FAMILIES: dict[str, tuple[BlockShape, ...]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gpt2": (GPT2_MLP,),
    "opt": (OPT_MLP,),
}

# Why a supported family has no head omission: said in the one-time log line.
NO_ATTENTION_REASON = {
    "gpt2": "GPT-2 computes q/k/v in one fused c_attn projection",
    "opt": "OPT attention is not the Llama-style attention SAT slices",
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)
