"""Model-level wiring of LTE: find the gated MLPs through the registry, route them, and hand back an `LTEHandle`.

:func:`apply_lte` groups each routed MLP's neurons into experts (:mod:`.experts`), gives it a router and binds
the routed forward on the MLP instance (:mod:`.router`); :meth:`LTEHandle.save` writes the routers and expert
orders beside a saved model (``lte.safetensors`` + ``lte_config.json``) and :func:`load_lte` installs them on a
loaded model for sparse inference. The model's own weights and state dict are never changed: the model saves and
loads as a plain ``transformers`` model that runs dense.

The stage-1 losses enter the training loss through a forward hook on the model: when the model returns a
``loss`` (labels given) in training mode in stage ``soft``, the hook adds the weighted efficiency and
separability terms of that forward's router scores to it, as Hugging Face MoE models add their auxiliary loss, so
the user's loss code and the Trainer's ``compute_loss`` stay unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..patch.blocks import dense_layer_set, find_blocks, layer_index
from ..patch.model import handle_of
from ..patch.registry import FAMILIES, BlockShape
from .config import LTEConfig, to_lte_config
from .errors import LTEConfigError, LTEError
from .experts import ExpertGroups, group_neurons
from .losses import stage1_loss
from .router import RoutedMLP, Router, base_weight, is_gated, mlp_width, neuron_features

logger = logging.getLogger("sat_trainer")

WEIGHTS_NAME = "lte.safetensors"
CONFIG_NAME = "lte_config.json"
FORMAT = "sat_trainer.lte/1"
STAGES = ("soft", "hard")

_HANDLES: weakref.WeakKeyDictionary[nn.Module, LTEHandle] = weakref.WeakKeyDictionary()


def gated_model_types() -> list[str]:
    """The registered ``model_type`` values whose MLP LTE can route (a gated MLP)."""
    return sorted(t for t, shapes in FAMILIES.items() if any(is_gated(s) for s in shapes))


class LTEHandle:
    """Controls an LTE model: the stage, the routers, what is saved; made by :func:`apply_lte` or :func:`load_lte`.

    ``blocks`` are the routed MLPs in model order; ``stage`` is ``"soft"`` (stage 1: every expert weighted by its
    score, routers trainable, the stage-1 losses added to the model's loss) or ``"hard"`` (stage 2 and inference:
    only experts whose score exceeds ``config.threshold`` run, routers frozen). ``accumulation_scale`` multiplies
    the added losses when the model's loss is already normalised over the gradient-accumulation window (the
    Trainer then passes ``num_items_in_batch``); :class:`~sat_trainer.lte.callback.LTECallback` sets it to
    1 / gradient_accumulation_steps.
    """

    def __init__(self, model: nn.Module, config: LTEConfig, blocks: list[RoutedMLP]):
        self.config = config
        self.blocks = blocks
        self.stage = "soft"
        self.accumulation_scale = 1.0
        self._model_ref = weakref.ref(model)
        self._collecting = False
        self._scores: list[torch.Tensor] = []
        self._active_sum: dict[int, torch.Tensor] = {}
        self._active_count: dict[int, int] = {}
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        for block in blocks:
            block.patch(self)
        self._hooks = [
            model.register_forward_pre_hook(self._start_forward),
            model.register_forward_hook(self._add_losses, with_kwargs=True),
        ]
        self.set_stage("soft")

    # ---- what the routed forwards read ----------------------------------------------------------------------

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def soft_forward(self) -> str:
        return self.config.soft_forward

    @property
    def router_grad_to_model(self) -> bool:
        return self.config.router_grad_to_model

    def record(self, index: int, scores: torch.Tensor) -> None:
        """Called by each routed MLP with its scores: kept for this forward's losses and the active fraction."""
        if not self._collecting:  # eval, a forward outside the model's, or a gradient-checkpoint recompute
            return
        self._scores.append(scores)
        active = (scores.detach() > self.config.threshold).float().mean()
        self._active_sum[index] = self._active_sum[index] + active if index in self._active_sum else active
        self._active_count[index] = self._active_count.get(index, 0) + 1

    # ---- control ----------------------------------------------------------------------------------------------

    def set_stage(self, stage: str) -> None:
        """``"soft"`` (routers trainable) or ``"hard"`` (routers frozen: ``requires_grad`` False).

        Raises:
            LTEError: another stage name.
        """
        if stage not in STAGES:
            raise LTEError(f"LTE stage must be one of {', '.join(STAGES)}; got {stage!r}")
        self.stage = stage
        for param in self.router_parameters():
            param.requires_grad_(stage == "soft")
        if stage == "soft":
            for block in self.blocks:
                block.layout = None

    def prepare_inference(self) -> int:
        """Lay every routed MLP's experts out contiguously now for the sparse inference path (otherwise done at the
        first eval forward in stage hard); see :mod:`sat_trainer.lte.inference`.

        Returns:
            how many routed MLPs can take the fast path (plain ``nn.Linear`` projections, weights on the CPU).
        """
        return sum(block.fast_layout() is not None for block in self.blocks)

    def fit_routers(self, batches) -> int:
        """Fit every router to its MLP's per-token expert activations on ``batches`` (what ``router_init:
        activations`` does at train start; :mod:`sat_trainer.lte.fit`). The routers are first reset to every expert
        on, so the measured forward is the dense model's; the stage is left as it was. Returns the tokens used."""
        from .fit import fit_routers

        model = self._model_ref()
        stage = self.stage
        generator = torch.Generator().manual_seed(self.config.seed)
        for block in self.blocks:
            block.router.reset("open", generator)
        self.set_stage("hard")
        try:
            return fit_routers(self.blocks, model, batches)
        finally:
            self.set_stage(stage)

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for b in self.blocks for p in (b.router.weight, b.router.bias)]

    def active_fractions(self, reset: bool = True) -> dict[str, float]:
        """Per routed MLP (by name), the mean fraction of its experts (= of its neurons) with a score over the
        threshold, over the training forwards since the last reset (a host sync: call it when logging)."""
        out = {
            b.name: float(self._active_sum[b.index]) / self._active_count[b.index]
            for b in self.blocks
            if b.index in self._active_sum
        }
        if reset:
            self._active_sum, self._active_count = {}, {}
        return out

    def stage1_losses(self, reset: bool = True) -> dict[str, float]:
        """The mean efficiency and separability terms added since the last reset (empty when none was added)."""
        out = {}
        if self._loss_sum is not None and self._loss_count:
            efficiency, separability = (self._loss_sum / self._loss_count).tolist()
            out = {"efficiency_loss": efficiency, "separability_loss": separability}
        if reset:
            self._loss_sum, self._loss_count = None, 0
        return out

    def remove(self) -> None:
        """Put back every MLP's own forward, drop the routers and hooks (the model is as before :func:`apply_lte`)."""
        model = self._model_ref()
        if model is not None and _HANDLES.get(model) is self:
            del _HANDLES[model]
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for block in self.blocks:
            block.unpatch()

    def restore(self, folder: str | Path) -> None:
        """Copy the routers and expert orders saved in ``folder`` by :meth:`save` into this handle's routed MLPs,
        in place (the router parameters stay the same objects, so an optimizer built on them keeps its state);
        what a resumed run needs. The stage is left as it is.

        Raises:
            LTEConfigError: the saved config differs from this handle's (each differing key with both values).
            LTEError: a missing or malformed file, or files saved for other routed MLPs or shapes.
        """
        folder = Path(folder)
        meta, config, tensors = _read_saved(folder, "resume")
        mine, theirs = self.config.to_dict(), config.to_dict()
        diff = [
            f"{k} {mine.get(k)!r} here, {theirs.get(k)!r} in the checkpoint" for k in sorted(mine) if mine.get(k) != theirs.get(k)
        ]
        if diff:
            raise LTEConfigError(
                f"LTE settings differ from those saved in {folder / CONFIG_NAME}: {'; '.join(diff)}; a resumed run must "
                "use the checkpoint's LTE settings"
            )
        saved_layers = sorted(int(b["layer"]) for b in meta.get("blocks", []))
        layers = sorted(layer_index(b.name) for b in self.blocks)
        if saved_layers != layers:
            raise LTEError(f"resume: {folder} routes the MLPs of layers {saved_layers}, this model routes layers {layers}")
        loaded = []
        for block in self.blocks:
            weight, bias, order = _saved_block(folder, tensors, block.name, block.width, block.router.weight.shape[1], config)
            loaded.append((block, weight, bias, ExpertGroups(order, config.expert_size).expert_of))
        with torch.no_grad():
            for block, weight, bias, expert_of in loaded:
                block.router.weight.copy_(weight)
                block.router.bias.copy_(bias)
                block.expert_of = expert_of.to(block.router.weight.device)

    def digest(self) -> str:
        """A SHA-256 of the routers and expert orders (what :meth:`save` writes): tells a checkpoint's files apart."""
        sha = hashlib.sha256()
        for block in self.blocks:
            for param in (block.router.weight, block.router.bias):
                sha.update(param.detach().float().cpu().contiguous().numpy().tobytes())
            sha.update(block.expert_of.cpu().contiguous().numpy().tobytes())
        return sha.hexdigest()

    def save(self, folder: str | Path) -> None:
        """Write ``lte.safetensors`` (each routed MLP's router weight, bias and expert order, by layer; stored
        values, see :class:`~sat_trainer.lte.router.Router`) and
        ``lte_config.json`` (the config and the routed MLPs) into ``folder`` (created if needed), beside a
        ``save_pretrained`` model."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for block in self.blocks:
            layer = layer_index(block.name)
            tensors[f"{layer}.router"] = block.router.weight.detach().float().cpu().contiguous()
            tensors[f"{layer}.router_bias"] = block.router.bias.detach().float().cpu().contiguous()
            tensors[f"{layer}.order"] = torch.argsort(block.expert_of.cpu(), stable=True).contiguous()
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "model_type": _model_type(self._model_ref()),
            "config": self.config.to_dict(),
            "blocks": [
                {"layer": layer_index(b.name), "name": b.name, "width": b.width, "experts": b.router.weight.shape[0]}
                for b in self.blocks
            ],
        }
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    # ---- model hooks ------------------------------------------------------------------------------------------

    def _start_forward(self, module: nn.Module, args: tuple) -> None:
        self._scores = []
        self._collecting = module.training

    def _add_losses(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        scores, self._scores, self._collecting = self._scores, [], False
        if self.stage != "soft" or not scores or not isinstance(output, Mapping) or output.get("loss") is None:
            return None
        cfg = self.config
        if cfg.efficiency_weight == 0 and cfg.separability_weight == 0:
            return None
        total, efficiency, separability = stage1_loss(scores, cfg.threshold, cfg.efficiency_weight, cfg.separability_weight)
        # a loss normalised by num_items_in_batch is not divided by the accumulation steps again (Trainer.training_step)
        scale = self.accumulation_scale if kwargs.get("num_items_in_batch") is not None else 1.0
        output["loss"] = output["loss"] + (total * scale).to(output["loss"].dtype)
        terms = torch.stack([efficiency, separability])
        self._loss_sum = terms if self._loss_sum is None else self._loss_sum + terms
        self._loss_count += 1
        return output


def apply_lte(model: nn.Module, config: LTEConfig | Mapping[str, Any] | str | Path | None = None) -> LTEHandle:
    """Route ``model``'s gated MLPs for LTE, in place, starting in stage ``soft``.

    Groups each MLP's neurons into experts by balanced k-means (``expert_size``, ``kmeans_iterations``, ``seed``)
    and gives it a freshly initialised router (``router_init``). Apply before any wrapper is built
    (``LTECallback`` does it at ``on_init_end``).

    Args:
        model: a causal LM of a registered family with a gated MLP (``config.model_type``), bare or PEFT-wrapped.
        config: an LTEConfig, a mapping of its keys, a YAML path, or None (defaults).

    Returns:
        the :class:`LTEHandle` that controls it.

    Raises:
        LTEConfigError: a bad setting, or an ``expert_size`` that does not divide an MLP's width, or a
            ``dense_layers`` index outside the model; nothing is changed then.
        LTEError: an unsupported architecture, a model without routable MLPs, or a model already routed or
            patched by SAT.
    """
    config = to_lte_config(config)
    found = _routable_blocks(model, config)
    _check_expert_size(found, config.expert_size)
    generator = torch.Generator().manual_seed(config.seed)
    specs = []
    for name, shape, block in found:
        groups = group_neurons(
            neuron_features(block, shape), config.expert_size, config.kmeans_iterations, config.seed + layer_index(name)
        )
        router = _new_router(block, shape, groups.num_experts, config.router_lr_scale)
        router.reset(config.router_init, generator)
        specs.append((name, shape, block, router, groups))
    return _install(model, config, specs)


def load_lte(model: nn.Module, folder: str | Path) -> LTEHandle:
    """Install the routers and expert orders saved by :meth:`LTEHandle.save` on ``model``, in stage ``hard``
    (sparse inference: only the experts over the threshold run; routers frozen), and lay the experts out for the
    fast path (:mod:`sat_trainer.lte.inference`: eval mode, autograd off, CPU, plain ``nn.Linear`` projections).

    Everything is read and checked before the model is touched.

    Args:
        model: the model the files were saved beside, loaded with plain ``transformers`` (or PEFT-wrapped).
        folder: the folder holding ``lte.safetensors`` and ``lte_config.json``.

    Returns:
        the :class:`LTEHandle`; ``handle.set_stage("soft")`` continues stage 1, ``handle.remove()`` runs dense.

    Raises:
        LTEConfigError: the saved config has an unknown key or a bad value.
        LTEError: a missing or malformed file, or files saved for another architecture or shape.
    """
    folder = Path(folder)
    meta, config, tensors = _read_saved(folder, "load_lte")
    if meta.get("model_type") != _model_type(model):
        raise LTEError(f"load_lte: {folder} was saved for model_type {meta.get('model_type')!r}, not {_model_type(model)!r}")
    found = _routable_blocks(model, config)
    saved_layers = sorted(int(b["layer"]) for b in meta.get("blocks", []))
    layers = sorted(layer_index(name) for name, _, _ in found)
    if saved_layers != layers:
        raise LTEError(
            f"load_lte: {folder} routes the MLPs of layers {saved_layers}, this model has routable MLPs in layers {layers}"
        )
    specs = []
    for name, shape, block in found:
        width, hidden = mlp_width(block, shape), base_weight(getattr(block, shape.inputs[0])).shape[1]
        weight, bias, order = _saved_block(folder, tensors, name, width, hidden, config)
        experts = width // config.expert_size
        router = _new_router(block, shape, experts, config.router_lr_scale)
        with torch.no_grad():
            router.weight.copy_(weight)
            router.bias.copy_(bias)
        specs.append((name, shape, block, router, ExpertGroups(order, config.expert_size)))
    handle = _install(model, config, specs)
    handle.set_stage("hard")
    handle.prepare_inference()
    return handle


def lte_handle_of(model: nn.Module) -> LTEHandle | None:
    """The handle of a routed model (e.g. for a callback rebuilt on resume), else None."""
    return _HANDLES.get(model)


def _install(model: nn.Module, config: LTEConfig, specs: list) -> LTEHandle:
    blocks = [
        RoutedMLP(i, name, shape, block, router, groups.expert_of) for i, (name, shape, block, router, groups) in enumerate(specs)
    ]
    handle = LTEHandle(model, config, blocks)
    _HANDLES[model] = handle
    logger.info(
        "sat_trainer: LTE routes %d MLPs (%d experts of %d neurons each in the first)",
        len(blocks),
        blocks[0].router.weight.shape[0],
        config.expert_size,
    )
    return handle


def _routable_blocks(model: nn.Module, config: LTEConfig) -> list[tuple[str, BlockShape, nn.Module]]:
    """(name, shape, block) of every gated MLP LTE routes under ``config``; raises before anything is changed."""
    model_type = _model_type(model)
    if model in _HANDLES:
        raise LTEError(f"{type(model).__name__} is already routed by LTE; call handle.remove() first")
    if handle_of(model) is not None:
        raise LTEError(
            f"{type(model).__name__} is patched by SAT; LTE and SAT on one model are not supported (remove_sat(model) first)"
        )
    if model_type not in FAMILIES:
        raise LTEError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported by LTE; supported: {', '.join(gated_model_types())}"
        )
    shapes = [s for s in FAMILIES[model_type] if is_gated(s)]
    if not shapes:
        mlp = next((s for s in FAMILIES[model_type] if s.kind == "mlp"), None)
        what = f"its MLP ({'/'.join(mlp.inputs)} -> {mlp.output}) is not gated" if mlp else "it has no MLP LTE knows"
        raise LTEError(
            f"model_type {model_type!r} ({type(model).__name__}) cannot use LTE: {what}; LTE routes gated MLPs "
            f"(act(gate(x)) * up(x) -> down); supported: {', '.join(gated_model_types())}"
        )
    dense = dense_layer_set(model, config.dense_layers, "LTE", LTEConfigError)
    found = [block for block in find_blocks(model, shapes, dense) if layer_index(block[0]) is not None]
    if not found:
        raise LTEError(
            f"no routable gated MLP found in {type(model).__name__} (model_type {model_type!r}, dense_layers {config.dense_layers})"
        )
    return found


def _read_saved(folder: Path, who: str) -> tuple[dict, LTEConfig, dict[str, torch.Tensor]]:
    """The metadata, config and tensors that :meth:`LTEHandle.save` wrote into ``folder``, checked for form."""
    from safetensors.torch import load_file

    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise LTEError(
                f"{who}: {folder / name} not found; a folder written by LTEHandle.save holds {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    except ValueError as err:
        raise LTEError(f"{who}: {folder / CONFIG_NAME} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LTEError(f"{who}: {folder / CONFIG_NAME} is not an LTE file of format {FORMAT!r}")
    try:
        config = LTEConfig.from_dict(meta.get("config") or {})
    except LTEConfigError as err:
        raise LTEConfigError(f"{folder / CONFIG_NAME}: {err}") from None
    return meta, config, load_file(str(folder / WEIGHTS_NAME))


def _saved_block(
    folder: Path, tensors: dict[str, torch.Tensor], name: str, width: int, hidden: int, config: LTEConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The saved router weight, bias (zeros when absent: files written before the router had one) and expert order
    of the routed MLP ``name``, checked against its shape."""
    layer = layer_index(name)
    weight, order = tensors.get(f"{layer}.router"), tensors.get(f"{layer}.order")
    experts = width // config.expert_size
    bias = tensors.get(f"{layer}.router_bias", torch.zeros(experts))
    if (
        weight is None
        or order is None
        or tuple(weight.shape) != (experts, hidden)
        or tuple(order.shape) != (width,)
        or tuple(bias.shape) != (experts,)
    ):
        raise LTEError(
            f"load_lte: {folder / WEIGHTS_NAME} does not fit {name} ({width} neurons, hidden size {hidden}, "
            f"{experts} experts of {config.expert_size}): router {None if weight is None else tuple(weight.shape)}, "
            f"order {None if order is None else tuple(order.shape)}"
        )
    order = order.long()
    if not torch.equal(torch.sort(order).values, torch.arange(width)):
        raise LTEError(
            f"load_lte: {folder / WEIGHTS_NAME}: the expert order of layer {layer} is not a permutation of {width} neurons"
        )
    return weight, bias, order


def _check_expert_size(found: list, size: int) -> None:
    for name, shape, block in found:
        width = mlp_width(block, shape)
        if width % size:
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            raise LTEConfigError(
                f"LTE config key 'expert_size' has invalid value {size}: {name} has {width} neurons, not a multiple of "
                f"{size}; allowed: a divisor of {width} ({', '.join(map(str, divisors))})"
            )


def _new_router(block: nn.Module, shape: BlockShape, experts: int, lr_scale: float) -> Router:
    weight = base_weight(getattr(block, shape.inputs[0]))
    if not weight.is_floating_point():
        raise LTEError(f"{type(block).__name__}: LTE needs floating-point MLP weights, got {weight.dtype} (a quantised base)")
    return Router(weight.shape[1], experts, lr_scale, device=weight.device, dtype=weight.dtype)


def _model_type(model: nn.Module | None) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)
