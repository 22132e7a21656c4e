"""The model shapes `sat-train pretrain` initialises from scratch, and the check of a scenario's ``model:`` mapping.

A pre-training scenario names its model as a shape, not a checkpoint::

    model:
      shape: llama-10m       # one of SHAPES
      vocab_size: 8192       # the byte-level BPE trained on data.train's training split (default 8192)
      num_hidden_layers: 12  # optional: any field of the shape itself, overridden

A shape's name gives its architecture and its size in parameters at the default vocabulary (tied embeddings
included; tests/test_pretrain.py counts them). ``llama-6m`` is `sat-train pretrain-base`'s model. The position
count is not a field: it is set from ``data.max_length`` (at least 1024). This module imports nothing heavy, so
a scenario is checked before torch loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SATConfigError
from ..value_range import ints

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DEFAULT_VOCAB = 8192
VOCAB_RANGE = ints(262)  # the 256 bytes and the 5 special tokens, and at least one merge
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (architecture, its config fields)
    "llama-6m": (
        "llama",
        dict(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "llama-10m": (
        "llama",
        dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
    ),
    "llama-30m": (
        "llama",
        dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
    ),
    "gpt2-10m": ("gpt2", dict(n_embd=256, n_inner=1024, n_layer=10, n_head=8, tie_word_embeddings=True)),
    "gpt2-30m": ("gpt2", dict(n_embd=512, n_inner=2048, n_layer=8, n_head=8, tie_word_embeddings=True)),
}
# (width, heads, kv heads) field names per architecture: the width splits into heads, the heads into KV groups
DIVISIONS = {"llama": ("hidden_size", "num_attention_heads", "num_key_value_heads"), "gpt2": ("n_embd", "n_head", None)}
LAYERS = {"llama": "num_hidden_layers", "gpt2": "n_layer"}


def check_shape_spec(raw: Any) -> dict[str, Any]:
    """Validate a pretrain scenario's ``model:`` mapping; one :class:`SATConfigError` line per problem.

    Returns:
        ``{"shape", "architecture", "fields" (the shape's with the overrides), "vocab_size"}``.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("shape"), str):
        raise SATConfigError(
            f"key 'model' has invalid value {raw!r}; allowed (sat-train pretrain): a mapping with 'shape' "
            f"({', '.join(SHAPES)}), optional 'vocab_size' and the shape's own fields"
        )
    name = raw["shape"]
    if name not in SHAPES:
        raise SATConfigError(f"key 'model.shape' has invalid value {name!r}; allowed: {', '.join(SHAPES)}")
    architecture, defaults = SHAPES[name]
    unknown = sorted(set(raw) - {"shape", "vocab_size", *defaults})
    if unknown:
        raise SATConfigError(
            f"unknown key 'model.{unknown[0]}' for shape {name} ({architecture}); allowed: shape, vocab_size, {', '.join(defaults)}"
        )
    fields = {**defaults, **{k: v for k, v in raw.items() if k in defaults}}
    for key, value in fields.items():
        if isinstance(defaults[key], bool):
            if not isinstance(value, bool):
                raise SATConfigError(f"key 'model.{key}' has invalid value {value!r}; allowed: true or false")
        else:
            ints(1).check(f"model.{key}", value)
    width, heads, groups = DIVISIONS[architecture]
    if fields[width] % fields[heads]:
        raise SATConfigError(
            f"key 'model.{width}' has invalid value {fields[width]}; allowed: a multiple of {heads}={fields[heads]}"
        )
    if groups is not None and fields[heads] % fields[groups]:
        raise SATConfigError(
            f"key 'model.{groups}' has invalid value {fields[groups]}; allowed: a divisor of {heads}={fields[heads]}"
        )
    vocab = raw.get("vocab_size", DEFAULT_VOCAB)
    VOCAB_RANGE.check("model.vocab_size", vocab)
    return {"shape": name, "architecture": architecture, "fields": fields, "vocab_size": vocab}


def known_config(spec: dict[str, Any], max_length: int) -> dict[str, Any]:
    """What :func:`~.model_fit.check_fit` reads of the model a checked spec builds: its layers and positions."""
    return {
        LAYERS[spec["architecture"]]: spec["fields"][LAYERS[spec["architecture"]]],
        "max_position_embeddings": positions(max_length),
    }


def positions(block_size: int) -> int:
    """The position count a model from scratch gets for blocks of ``block_size`` (room for longer ones later)."""
    return max(1024, block_size)


def model_config(
    architecture: str, fields: dict[str, Any], tokenizer: PreTrainedTokenizerBase, block_size: int
) -> PretrainedConfig:
    """The HF config of a ``llama`` or ``gpt2`` model of ``fields`` (its size) for ``tokenizer``'s vocabulary and
    special tokens, with room for blocks of ``block_size``."""
    import transformers

    tokens = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "gpt2":
        return transformers.GPT2Config(n_positions=positions(block_size), **tokens, **fields)
    return transformers.LlamaConfig(max_position_embeddings=positions(block_size), **tokens, **fields)
