"""Which model families SAT supports, described by block shape, not by code.

A family is one registry entry: the blocks it has and, for each, the attribute names of its
input projections (output features sliced) and its output projection (input features sliced).
One patcher (:mod:`sat_trainer.patch.units`) serves them all, so adding a Llama-like family is
one line here plus a test.

A *fused* input projection (Phi-3's and GLM's ``gate_up_proj``, Phi-3's ``qkv_proj``: one
``Linear`` whose output rows are several logical projections back to back) is described by its
``fused`` segments, not by a patcher of its own: each segment is laid out like one unfused input
(gate, up; or q, k, v in that order), a unit owns its rows of every segment, and the patched
projection returns each segment's kept rows, segment after segment (``[gate_kept | up_kept]``,
``[q_kept | k_kept | v_kept]``), so the block's own split still finds its parts.

Segments may differ in size. An MLP's are equal shares (``chunk(2, dim=-1)``). An attention
block splits its fused output at offsets computed from head counts it reads from attributes
(Phi-3: ``config.num_attention_heads * head_dim``, then ``num_key_value_heads * head_dim``):
each segment names that attribute (``Segment.heads``). SAT reads the segment sizes from them,
and while a block runs sparse sets them to the kept head counts, on the block instance only
(a ``config.`` path gets a per-instance shallow copy of the config; the model's shared config
is never written), restoring them when the block runs dense, in eval and on ``remove_sat``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """One logical projection inside a fused input projection, in row order."""

    name: str  # what it is ("gate", "q", ...): for messages and readers
    # attention: the block attribute (dotted for a nested one, "config.num_attention_heads") holding this
    # segment's head count, which the block's forward splits the fused output by; None: an equal share
    heads: str | None = None


@dataclass(frozen=True)
class BlockShape:
    """Where a block's projections live, relative to the block module."""

    kind: str  # "mlp" or "attention"
    inputs: tuple[str, ...]
    output: str
    activation: str | None = None  # MLP: attribute of the activation function applied to the first input's output
    fused: tuple[Segment, ...] = ()  # non-empty: the one input projection holds these segments back to back

    def __post_init__(self) -> None:
        if self.fused and len(self.inputs) != 1:
            raise ValueError(f"a fused BlockShape has one input projection, got {self.inputs}")
        if len({s.heads is None for s in self.fused}) > 1:
            raise ValueError(f"a fused BlockShape's segments are all equal shares or all sized by head counts, got {self.fused}")
        if self.fused and self.fused[0].heads is not None and (self.kind != "attention" or len(self.fused) != 3):
            raise ValueError(f"segments sized by head counts are an attention block's q, k, v, got {self.fused}")


GATED_MLP = BlockShape("mlp", ("gate_proj", "up_proj"), "down_proj", "act_fn")
UP_MLP = BlockShape("mlp", ("up_proj",), "down_proj", "act_fn")  # ungated act(up(x)): Nemotron's relu2, Apertus' xIELU
FUSED_GATED_MLP = BlockShape(
    "mlp", ("gate_up_proj",), "down_proj", "activation_fn", fused=(Segment("gate"), Segment("up"))
)  # Phi-3, GLM
# Phi-3: qkv_proj's rows are [q | k | v], split at config.num_attention_heads * head_dim and num_key_value_heads * head_dim
FUSED_QKV_ATTENTION = BlockShape(
    "attention",
    ("qkv_proj",),
    "o_proj",
    fused=(Segment("q", "config.num_attention_heads"), Segment("k", "num_key_value_heads"), Segment("v", "num_key_value_heads")),
)
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
    "phi3": (FUSED_GATED_MLP, FUSED_QKV_ATTENTION),
    "seed_oss": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "stablelm": (GATED_MLP,),
    "starcoder2": (GPT2_MLP, LLAMA_ATTENTION),
    "vaultgemma": _LLAMA_LIKE,
}

_FULL_WIDTH_QK_NORM = (
    "its q_norm/k_norm normalise over all heads' features at once, so a kept-heads-only q/k would be normalised differently"
)

# Why a supported family has no head omission: said in the one-time log line.
NO_ATTENTION_REASON = {
    "gpt2": "GPT-2 computes q/k/v in one fused c_attn projection",
    "opt": "OPT attention is not the Llama-style attention SAT slices",
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
