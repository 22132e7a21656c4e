"""Where a model's blocks are: the registry's block shapes found among its modules, by decoder layer.

SAT (:mod:`sat_trainer.patch.model`) and LTE (:mod:`sat_trainer.lte.model`) find the blocks they patch
with the same scan, so a family registered once is found alike by both, and ``dense_layers`` means
the same in both.
"""

from __future__ import annotations

from torch import nn

from .registry import BlockShape


def layer_index(name: str) -> int | None:
    """The decoder layer a block belongs to: the last integer in its module path
    (``model.layers.3.mlp`` -> 3, ``transformer.h.3.mlp`` -> 3)."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def num_layers(model: nn.Module) -> int:
    """The model's decoder layer count (``config.num_hidden_layers``; 0 when it has none)."""
    return int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0)


def dense_layer_set(model: nn.Module, dense_layers: list[int], kind: str, error: type[Exception]) -> set[int]:
    """``dense_layers`` with negative indices resolved; raises ``error`` (``kind``: "SAT" or "LTE", the
    config named in the message) for an index outside the model."""
    n = num_layers(model)
    if dense_layers and n <= 0:
        raise error(
            f"{kind} config key 'dense_layers' = {dense_layers}: {type(model).__name__}'s config has no num_hidden_layers"
        )
    bad = [i for i in dense_layers if not -n <= i < n]
    if bad:
        raise error(
            f"{kind} config key 'dense_layers' has invalid value {bad}: {type(model).__name__} has {n} layers; allowed: {-n}..{n - 1}"
        )
    return {i % n for i in dense_layers}


def find_blocks(model: nn.Module, shapes: list[BlockShape], dense: set[int]) -> list[tuple[str, BlockShape, nn.Module]]:
    """(name, shape, module) of every module holding all of a shape's projections, in module order, outside the
    ``dense`` layers."""
    return [
        (name, shape, module)
        for name, module in model.named_modules()
        for shape in shapes
        if _has_projections(module, shape) and layer_index(name) not in dense
    ]


def decoder_layers(model: nn.Module, shapes: list[BlockShape]) -> list[tuple[int, str, nn.Module]]:
    """(index, name, module) of every decoder layer, in layer order: the module that a found block's name
    numbers (``model.layers.3`` for ``model.layers.3.mlp``; OPT's blocks are their layers), so the layers are
    the ones the block scan finds, by the same names and indices as ``dense_layers``."""
    layers: dict[int, str] = {}
    for name, _, _ in find_blocks(model, shapes, set()):
        parts = name.split(".")
        last = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
        if last is not None:
            layers.setdefault(int(parts[last]), ".".join(parts[: last + 1]))
    return [(index, name, model.get_submodule(name)) for index, name in sorted(layers.items())]


def _has_projections(module: nn.Module, shape: BlockShape) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Module) for a in (*shape.inputs, shape.output))
