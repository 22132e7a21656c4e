"""Model-level wiring: find a model's blocks, patch them in place, and hand back a `SATHandle`.

Patching is per instance and before any wrapper (accelerate, DDP, FSDP, DeepSpeed) is built:
other models in the process stay untouched, nothing is added to the state dict, and
:func:`remove_sat` restores the original forwards exactly.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..config import TARGETS, SATConfig, to_config
from ..errors import SATError
from ..ops import SLICEABLE, weight_numel
from .blocks import decoder_layers, dense_layer_set, find_blocks, layer_index, num_layers
from .forward_context import ForwardContext
from .layer_skip import LayerSkip
from .registry import FAMILIES, no_attention_reason, supported_model_types
from .units import BlockUnit

logger = logging.getLogger("sat_trainer")

_HANDLES: weakref.WeakKeyDictionary[nn.Module, SATHandle] = weakref.WeakKeyDictionary()


class _ContextField:
    """A handle attribute that reads and writes the same-named attribute of the handle's forward context."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, handle: SATHandle | None, owner: type | None = None) -> Any:
        return self if handle is None else getattr(handle.context, self.name)

    def __set__(self, handle: SATHandle, value: Any) -> None:
        setattr(handle.context, self.name, value)


class SATHandle:
    """Controls a patched model: the omission rate, when a new kept set is drawn, what is kept.

    Made by :func:`apply_sat`, which patches the model's blocks in place; :meth:`remove` (or
    :func:`remove_sat`) undoes it. ``draw_id`` numbers the draws; every block draws its kept set at
    most once per number, from a generator seeded by (config seed, draw_id, block index), so the
    choice is the same on every rank and after a resume. ``layers`` (``targets`` with layers, else None) skips
    whole decoder layers per draw (:mod:`~sat_trainer.patch.layer_skip`). ``rate``, ``draw_id``, ``seq_len``,
    ``token_mask``, ``position_ids`` and ``token_split`` are the handle's :class:`ForwardContext`'s,
    the state its blocks read (see there).

    Args:
        model: the model to patch (bare: before any accelerate, DDP, FSDP or DeepSpeed wrapper).
        config: its SAT settings.

    Raises:
        SATError: no block of ``model`` can be sliced under ``config``.
    """

    rate = _ContextField()
    draw_id = _ContextField()
    seq_len = _ContextField()
    token_mask = _ContextField()
    position_ids = _ContextField()
    token_split = _ContextField()

    def __init__(self, model: nn.Module, config: SATConfig):
        self.config = config
        self.context = ForwardContext(config)
        self.units: list[BlockUnit] = _sliceable_units(model, self.context)
        self.layers: LayerSkip | None = _layer_skip(model, self.context)
        self._model_ref = weakref.ref(model)
        for unit in self.units:
            unit.patch()
        if self.layers is not None:
            self.layers.patch()
        self._hooks = [
            *_mark_zero3_leaves(model, self.units),
            _clear_slices_after_every_optimizer_step(weakref.ref(self)),
            model.register_forward_pre_hook(self._read_model_inputs, with_kwargs=True),
        ]

    def _read_model_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.context.read_model_inputs(kwargs, module.training)

    def remove(self) -> None:
        """Put back the original forwards and head counts of every patched block and drop SAT's hooks
        (the model is then as before :func:`apply_sat`, and may be patched again; the handle controls
        nothing any more)."""
        model = self._model_ref()
        if model is not None and _HANDLES.get(model) is self:
            del _HANDLES[model]
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.clear_slices()
        for unit in self.units:
            unit.unpatch()
        if self.layers is not None:
            self.layers.unpatch()

    def clear_slices(self) -> None:
        """Drop every cached kept weight slice (the weights changed, or will be re-read)."""
        for unit in self.units:
            unit.slices.clear()

    def set_rate(self, rate: float | Mapping[str, float]) -> None:
        """Set the omission rate from now on; a rate that changes the kept count makes the next forward redraw.

        Args:
            rate: the fraction of each target's units to omit, in [0, 1) (0: the original forwards run); or one
                rate per target, ``{"mlp": ..., "attention": ..., "layers": ...}`` (schedule est), a target left
                out running dense. ``rate`` then reads the largest.

        Raises:
            SATError: a rate that is not a number in [0, 1), or a mapping key that is not a target.
        """
        rates = dict(rate) if isinstance(rate, Mapping) else {"": rate}
        for target, value in rates.items():
            if target not in ("", *TARGETS):
                raise SATError(f"omission rate given for {target!r}; allowed targets: {', '.join(TARGETS)}")
            if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
                raise SATError(f"omission rate must be a number in [0, 1), got {value!r}{f' for {target}' if target else ''}")
        self.context.axis_rates = {t: float(v) for t, v in rates.items()} if isinstance(rate, Mapping) else None
        self.context.rate = max((float(v) for v in rates.values()), default=0.0)

    def skipped_layers(self) -> list[int]:
        """The decoder layers the current draw skips in a training forward (``targets`` with layers; else none).

        Returns:
            their indices, ascending.
        """
        return sorted(self.layers.skipped()) if self.layers is not None else []

    def new_step(self) -> None:
        """The next forward draws a new kept set; until then every forward reuses the current one."""
        self.start_draw(self.draw_id + 1)

    def start_draw(self, draw_id: int) -> None:
        """Forwards from now on use draw number ``draw_id`` (each block draws for it once), with no cached slices.

        Args:
            draw_id: the draw number; the same number on every rank gives the same kept sets.
        """
        self.context.draw_id = draw_id
        self.clear_slices()

    def reset_draws(self) -> None:
        """Every block forgets its draw, cached scores and slices: the next forward draws afresh."""
        for unit in self.units:
            unit.reset_draws()

    def score_state(self) -> dict[str, dict]:
        """What each block's scores carry between draws, JSON-ready (see :meth:`BlockScorer.state`).

        Returns:
            {block name: its score state}, for a checkpoint.
        """
        return {u.name: u.scorer.state() for u in self.units}

    def load_score_state(self, state: dict[str, dict]) -> None:
        """Put back a :meth:`score_state` (a resumed run); blocks it does not name keep theirs.

        Args:
            state: a :meth:`score_state` result.
        """
        for unit in self.units:
            if unit.name in state:
                unit.scorer.load_state(state[unit.name])

    def kept(self) -> dict[str, torch.Tensor]:
        """What the latest draw keeps (a host sync: call it outside the training step).

        Returns:
            {block name: kept MLP channel indices or kept query-head indices}; blocks running dense
            (rate 0, eval) report everything kept.
        """
        return {u.name: u.kept_query_or_channels() if u.is_sparse() else torch.arange(u.n * u.heads_per_unit) for u in self.units}

    def kept_flops_fraction(self) -> float:
        """Matmul FLOPs of a training step at the current rate, over the dense model's.

        Counts every linear layer (LM head included; the embedding lookup has no matmul FLOPs)
        and the attention score/value products at the latest sequence length. With
        ``omit_in: forward_backward`` backward FLOPs scale the same way as the forward's ``f``; with
        ``omit_in: backward`` the forward is dense and the backward (twice the forward's FLOPs: input
        and weight gradients) is at that ratio, so the step's ratio is ``(1 + 2 f) / 3``; with
        ``weight_gradient`` only the weight gradient (a third) is at that ratio: ``(2 + f) / 3``.
        (Frozen base weights, as under LoRA, skip the weight gradient, which this count does not
        model.) With ``sparse_tokens: context`` the MLP blocks omit on the latest forward's context
        tokens only.

        Returns:
            the fraction, in (0, 1].

        Raises:
            SATError: the patched model no longer exists.
        """
        model = self._model_ref()
        if model is None:
            raise SATError("the model this handle patched no longer exists")
        dense = sum(weight_numel(m) for m in model.modules() if isinstance(m, SLICEABLE))
        attention_core = _attention_core_flops(model, self.seq_len)
        per_layer_core = attention_core / max(num_layers(model), 1)
        skipped = set(self.skipped_layers())
        saved = sum(
            per_layer_core + sum(weight_numel(m) for m in layer.modules() if isinstance(m, SLICEABLE))
            for index, _, layer in (self.layers.layers if skipped else [])
            if index in skipped
        )
        # sparse_tokens context: only the context rows of the latest forward omit (a host read: logging only)
        split = self.token_split
        sparse_share = split[1].numel() / max(split[0].numel() + split[1].numel(), 1) if split else 1.0
        for unit in (u for u in self.units if layer_index(u.name) not in skipped):  # a skipped layer's: counted whole
            omitted = (1.0 - unit.k() / unit.n) * (sparse_share if unit.kind == "mlp" else 1.0)
            saved += omitted * sum(weight_numel(m) for m in unit.members())
            if unit.kind == "attention":
                saved += omitted * per_layer_core
        fraction = (dense + attention_core - saved) / (dense + attention_core)
        if self.config.omit_in == "backward":
            return (1.0 + 2.0 * fraction) / 3.0
        if self.config.omit_in == "weight_gradient":  # dense forward and input gradient, weight gradient at the ratio
            return (2.0 + fraction) / 3.0
        return fraction


def apply_sat(model: nn.Module, config: SATConfig | Mapping[str, Any] | str | None = None) -> SATHandle:
    """Patch ``model``'s MLP and attention blocks in place for SAT.

    The handle starts at omission rate 0 (the original forwards run) until ``set_rate``.
    Patch before any wrapper is built (``SATCallback`` does it at ``on_init_end``).

    Args:
        model: a supported causal LM (``config.model_type`` in the registry), bare.
        config: a SATConfig, a mapping of its keys, a YAML path, or None (defaults).

    Returns:
        the :class:`SATHandle` that controls the patch.

    Raises:
        SATError: an unsupported architecture, nothing sliceable, or a model patched twice.
    """
    config = to_config(config)
    if model in _HANDLES:
        raise SATError(f"{type(model).__name__} is already patched by sat_trainer; call remove_sat(model) first")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise SATError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported by sat_trainer; "
            f"supported: {', '.join(supported_model_types())}"
        )
    handle = SATHandle(model, config)
    _HANDLES[model] = handle
    return handle


def remove_sat(model: nn.Module) -> None:
    """Put back the original forwards of a model patched by :func:`apply_sat` (no-op otherwise).

    Args:
        model: the model passed to :func:`apply_sat`.
    """
    handle = _HANDLES.get(model)
    if handle is not None:
        handle.remove()


def handle_of(model: nn.Module) -> SATHandle | None:
    """The handle of a patched model, e.g. for a callback rebuilt on resume."""
    return _HANDLES.get(model)


def _sliceable_units(model: nn.Module, context: ForwardContext) -> list[BlockUnit]:
    """The units of ``model``'s blocks that SAT slices under ``context.config`` (targets, dense layers,
    families whose attention runs dense); logs the blocks that fall back to dense, raises if none is left."""
    config = context.config
    model_type = model.config.model_type
    dense_attention = no_attention_reason(model_type, model.config)
    shapes = [s for s in FAMILIES[model_type] if s.kind in config.targets and not (s.kind == "attention" and dense_attention)]
    if "attention" in config.targets and dense_attention:
        logger.warning(
            "sat_trainer: attention heads are not omitted for model_type %r (%s); attention runs dense",
            model_type,
            dense_attention,
        )
    dense_layers = dense_layer_set(model, config.dense_layers, "SAT", SATError)
    units: list[BlockUnit] = []
    dense_fallbacks = []
    for name, shape, module in find_blocks(model, shapes, dense_layers):
        unit = BlockUnit(name, shape, module, len(units), context)
        if unit.fallback is not None:
            dense_fallbacks.append(f"{name} ({unit.fallback})")
        else:
            units.append(unit)
    if dense_fallbacks:
        logger.warning(
            "sat_trainer: %d block(s) have projections SAT cannot slice and run dense: %s",
            len(dense_fallbacks),
            "; ".join(dense_fallbacks),
        )
    if not units and "layers" not in config.targets:
        raise SATError(
            f"no sliceable {' or '.join(config.targets)} blocks found in {type(model).__name__} "
            f"(model_type {model_type!r}); nothing to omit"
        )
    if dense_layers:
        logger.info("sat_trainer: layers %s run dense (dense_layers)", sorted(dense_layers))
    return units


def _layer_skip(model: nn.Module, context: ForwardContext) -> LayerSkip | None:
    """``targets`` with layers: the decoder layers (outside ``dense_layers``) a draw may skip; else None."""
    config = context.config
    if "layers" not in config.targets:
        return None
    dense = dense_layer_set(model, config.dense_layers, "SAT", SATError)
    layers = [layer for layer in decoder_layers(model, list(FAMILIES[model.config.model_type])) if layer[0] not in dense]
    if not layers:
        raise SATError(f"targets 'layers': no decoder layer of {type(model).__name__} outside dense_layers to skip")
    return LayerSkip(layers, context)


def _mark_zero3_leaves(model: nn.Module, units: list[BlockUnit]) -> list[torch.utils.hooks.RemovableHandle]:
    """Under DeepSpeed ZeRO-3, make each patched block a leaf so all its projections are gathered
    at the block's forward: drawing a kept set reads every projection's weights (scores, slices)
    while the first one runs, and a not-yet-gathered parameter is an empty shard. Must happen
    before the engine is built, which is why ``apply_sat`` (and so ``SATCallback.on_init_end``) does it.

    A leaf's gradients are reduced by a full backward hook on the block, which fires once the
    gradients of the block's *positional* tensor inputs exist. Decoder layers call attention with
    keywords only (``self_attn(hidden_states=...)``): with no positional input the hook fires
    before the block's own backward, reduces and frees its parameters, and the projections'
    gradients then meet empty shards (DeepSpeed 0.19.8, even without SAT). So each leaf block gets
    a first pre-hook that passes ``hidden_states`` positionally.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        return []
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(u.block) for u in units}, key=lambda c: c.__name__)
    set_z3_leaf_modules(model, classes)
    hooks = [unit.block.register_forward_pre_hook(_hidden_states_positional, with_kwargs=True, prepend=True) for unit in units]
    logger.info("sat_trainer: ZeRO-3 leaf modules set: %s", ", ".join(c.__name__ for c in classes))
    return hooks


def _hidden_states_positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook: ``block(hidden_states=x, ...)`` -> ``block(x, ...)`` (see :func:`_mark_zero3_leaves`)."""
    if not args and "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        return (kwargs.pop("hidden_states"),), kwargs
    return None


def _clear_slices_after_every_optimizer_step(handle_ref: weakref.ref) -> torch.utils.hooks.RemovableHandle:
    """Cached kept slices must not outlive a weight update, and a fused optimizer step does not
    bump the parameters' in-place version: so every ``torch.optim`` step (a global hook, since
    the handle does not know the optimizer) drops them."""

    def clear(optimizer, args, kwargs) -> None:
        handle = handle_ref()
        if handle is not None:
            handle.clear_slices()

    return register_optimizer_step_post_hook(clear)


def _attention_core_flops(model: nn.Module, seq_len: int) -> float:
    """Per-token FLOPs of QK^T and AV over all layers (full, not causally halved) at ``seq_len``."""
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 0) or 0
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else 0)
    return 2.0 * seq_len * heads * head_dim * num_layers(model)
