"""Which model families SAT supports, described by block shape, not by code.

A family is one registry entry: the blocks it has and, for each, the attribute names of its
input projections (output features sliced) and its output projection (input features sliced).
One patcher (:mod:`sat_trainer.patch.units`) serves them all, so adding a Llama-like family is
one line here plus a test.

A *fused* input projection (Phi-3's and GLM's ``gate_up_proj``: one ``Linear`` whose output rows
are the gate rows, then the up rows) is described by ``fused_parts``, not by a patcher of its
own: each part is laid out like one unfused input, a unit owns the same rows of every part,
and the patched projection returns each part's kept rows, part after part
(``[gate_kept | up_kept]``), so the block's own ``chunk(2, dim=-1)`` still splits gate from up.
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
    fused_parts: int = 1  # >1: the one input projection holds this many equal parts back to back ([gate | up])

    def __post_init__(self) -> None:
        if self.fused_parts > 1 and len(self.inputs) != 1:
            raise ValueError(f"a fused BlockShape has one input projection, got {self.inputs}")


GATED_MLP = BlockShape("mlp", ("gate_proj", "up_proj"), "down_proj", "act_fn")
UP_MLP = BlockShape("mlp", ("up_proj",), "down_proj", "act_fn")  # ungated act(up(x)): Nemotron's relu2, Apertus' xIELU
FUSED_GATED_MLP = BlockShape("mlp", ("gate_up_proj",), "down_proj", "activation_fn", fused_parts=2)  # Phi-3, GLM: [gate | up]
LLAMA_ATTENTION = BlockShape("attention", ("q_proj", "k_proj", "v_proj"), "o_proj")
PHI_ATTENTION = BlockShape("attention", ("q_proj", "k_proj", "v_proj"), "dense")  # Phi-1/2: Llama-style, o_proj named dense
GPT2_MLP = BlockShape("mlp", ("c_fc",), "c_proj", "act")  # GPT-2: Conv1D, transposed weights; StarCoder2: nn.Linear
OPT_MLP = BlockShape("mlp", ("fc1",), "fc2", "activation_fn")  # OPT: on the decoder layer itself; Phi, nanochat: an MLP module

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
    # Llama-like decoders of transformers 5 (each checked against the masked reference in tests/test_exactness.py)
    "apertus": (UP_MLP, LLAMA_ATTENTION),
    "apertus1p5_text": (UP_MLP, LLAMA_ATTENTION),
    "arcee": (UP_MLP, LLAMA_ATTENTION),
    "cohere": _LLAMA_LIKE,
    "cohere2": _LLAMA_LIKE,
    "cwm": _LLAMA_LIKE,
    "diffllama": (GATED_MLP,),
    "ernie4_5": _LLAMA_LIKE,
    "exaone4": _LLAMA_LIKE,
    "glm": (FUSED_GATED_MLP, LLAMA_ATTENTION),
    "glm4": (FUSED_GATED_MLP, LLAMA_ATTENTION),
    "granite": _LLAMA_LIKE,
    "granite_swa": (GATED_MLP,),
    "helium": _LLAMA_LIKE,
    "hunyuan_v1_dense": _LLAMA_LIKE,
    "hyperclovax": _LLAMA_LIKE,
    "jais2": (UP_MLP, LLAMA_ATTENTION),
    "ministral": _LLAMA_LIKE,
    "ministral3": _LLAMA_LIKE,
    "nanochat": (OPT_MLP, LLAMA_ATTENTION),
    "nemotron": (UP_MLP, LLAMA_ATTENTION),
    "olmo": _LLAMA_LIKE,
    "olmo2": (GATED_MLP,),
    "olmo3": (GATED_MLP,),
    "phi": (OPT_MLP, PHI_ATTENTION),
    "phi3": (FUSED_GATED_MLP,),
    "seed_oss": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "stablelm": (GATED_MLP,),
    "starcoder2": (GPT2_MLP, LLAMA_ATTENTION),
    "vaultgemma": _LLAMA_LIKE,
}

_FULL_WIDTH_QK_NORM = "its q_norm/k_norm normalise over all heads' features at once, so a kept-heads-only q/k would be normalised differently"

# Why a supported family has no head omission: said in the one-time log line.
NO_ATTENTION_REASON = {
    "gpt2": "GPT-2 computes q/k/v in one fused c_attn projection",
    "opt": "OPT attention is not the Llama-style attention SAT slices",
    "phi3": (
        "Phi-3 splits its fused qkv_proj at offsets computed from config.num_attention_heads, "
        "so a kept-heads-only qkv output would be split in the wrong places"
    ),
    "olmo2": f"OLMo 2: {_FULL_WIDTH_QK_NORM}",
    "olmo3": f"OLMo 3: {_FULL_WIDTH_QK_NORM}",
    "diffllama": "DiffLlama's differential attention pairs heads by position, which omitting KV groups would re-pair",
    "granite_swa": "GraniteSWA's attention sinks are one learned logit per query head, read by head position",
    "stablelm": "StableLM views q/k/v with its own num_heads, not -1, so a kept-heads-only q/k/v does not fit",
}

# Families whose attention SAT slices unless a config option gives it per-head parameters that are
# read by head position (a kept-heads-only q/k would meet the wrong heads' weights): (option, why).
ATTENTION_DENSE_WHEN = {
    "cohere": ("use_qk_norm", "Cohere's use_qk_norm LayerNorms hold one weight row per head"),
}


def no_attention_reason(model_type: str, config: object) -> str | None:
    """Why ``model_type``'s attention runs dense for a model with ``config``, or None when SAT
    omits its KV groups."""
    if not any(s.kind == "attention" for s in FAMILIES[model_type]):
        return NO_ATTENTION_REASON.get(model_type, "not supported")
    option = ATTENTION_DENSE_WHEN.get(model_type)
    if option is not None and getattr(config, option[0], False):
        return option[1]
    return None


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)
