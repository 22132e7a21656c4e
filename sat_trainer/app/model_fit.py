"""Scenario values that must fit the model: checked on its ``config.json``, before weights load.

``data.max_length`` beyond the model's context (GPT-2 and OPT fail with an index error in the
position embedding, rotary models silently extrapolate), and ``sat.dense_layers`` naming a
layer the model does not have (refused by ``apply_sat`` only after the weights loaded), or
every layer (SAT would then omit nothing: a saving silently lost); and for LTE (:func:`check_lte_fit`)
``lte.dense_layers`` the same way and an ``lte.expert_size`` that does not divide the MLP width
(``intermediate_size``), which ``apply_lte`` would refuse only after the weights loaded. The config is a plain dict
(``config.json`` or ``PretrainedConfig.to_dict()``), so the check needs no import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SATConfigError

if TYPE_CHECKING:
    from ..lte.config import LTEConfig

LAYER_KEYS = ("num_hidden_layers", "n_layer")  # Llama-style, GPT-2
CONTEXT_KEYS = ("max_position_embeddings", "n_positions")
WIDTH_KEYS = ("intermediate_size",)


def check_fit(config: dict[str, Any], source: str, *, max_length: int, dense_layers: list[int] | None) -> None:
    """Raise :class:`SATConfigError` if ``max_length`` or ``dense_layers`` (None: dense run) do not fit."""
    context = _first(config, CONTEXT_KEYS)
    if context is not None and max_length > context:
        raise SATConfigError(
            f"key 'data.max_length' has invalid value {max_length}; allowed: an integer from 8 to {context} "
            f"(the context of {source}, {_key(config, CONTEXT_KEYS)})"
        )
    if dense_layers is not None:
        _check_dense_layers(
            config, source, dense_layers, "sat", "SAT would omit nothing; allowed: fewer layers (or sat: null to train dense)"
        )


def check_lte_fit(config: dict[str, Any], source: str, lte: LTEConfig) -> None:
    """Raise :class:`SATConfigError` if ``lte.dense_layers`` or ``lte.expert_size`` do not fit the model."""
    _check_dense_layers(
        config, source, lte.dense_layers, "lte", "LTE would route nothing; allowed: fewer layers (or lte: null to train dense)"
    )
    width = _first(config, WIDTH_KEYS)
    if width is not None and width % lte.expert_size:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        raise SATConfigError(
            f"key 'lte.expert_size' has invalid value {lte.expert_size}: the MLPs of {source} have {width} neurons "
            f"({_key(config, WIDTH_KEYS)}), not a multiple of it; allowed: a divisor of {width} ({', '.join(map(str, divisors))})"
        )


def _check_dense_layers(config: dict[str, Any], source: str, dense_layers: list[int], section: str, all_layers: str) -> None:
    layers = _first(config, LAYER_KEYS)
    if layers is None:
        return
    outside = [i for i in dense_layers if not -layers <= i < layers]
    if outside:
        raise SATConfigError(
            f"key '{section}.dense_layers' has invalid value {dense_layers}: {source} has {layers} layers; "
            f"allowed: indices in [{-layers}, {layers - 1}] (negative counts from the last)"
        )
    if len({i % layers for i in dense_layers}) == layers:
        raise SATConfigError(
            f"key '{section}.dense_layers' has invalid value {dense_layers}: it names all {layers} layers of {source}, so "
            + all_layers
        )


def _first(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    key = _key(config, keys)
    return config[key] if key is not None else None


def _key(config: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)), None)
