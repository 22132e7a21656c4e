"""What a block attribute holds: a plain projection, or a PEFT LoRA layer wrapping one.

SAT slices a LoRA layer by slicing its parts, never by rewriting PEFT's forward: on an input
projection (output features kept) the base layer and every ``lora_B`` keep the same rows; on
the output projection (input features kept) the base layer and every ``lora_A`` keep the same
columns. PEFT's own forward then runs unchanged, so ``merged``, ``disable_adapters``,
``active_adapters``, scaling and dropout behave exactly as without SAT.
Duck-typed on PEFT's attribute names, so peft stays an optional dependency.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import SATError
from .ops import is_sliceable


@dataclass
class Projection:
    """One block attribute resolved: the layer whose weights score and slice, plus LoRA parts."""

    base: nn.Module
    lora_in: list[nn.Module]  # lora_A per adapter: reads the projection's input features
    lora_out: list[nn.Module]  # lora_B per adapter: writes the projection's output features
    signature: tuple


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")


def signature(module: nn.Module) -> tuple:
    """Identity of a block attribute and its adapters: changes when LoRA is added or altered."""
    if not _is_lora(module):
        return (id(module),)
    variants = tuple(sorted(getattr(module, "lora_variant", {}) or {}))
    # merging writes the base weight through ``.data``: a new signature drops cached kept slices
    return (id(module), tuple(sorted(module.lora_A.keys())), variants, tuple(getattr(module, "merged_adapters", ())))


def resolve(name: str, module: nn.Module) -> Projection:
    """Resolve ``module``; raises for a LoRA variant (DoRA, ...) that cannot be sliced cheaply."""
    if not _is_lora(module):
        return Projection(module, [], [], signature(module))
    variants = sorted(getattr(module, "lora_variant", {}) or {})
    if variants:
        raise SATError(
            f"{name}: LoRA adapter(s) {variants} use a variant "
            f"({type(module.lora_variant[variants[0]]).__name__}, e.g. DoRA) that SAT cannot slice; "
            "allowed: plain LoRA (use_dora=False), or leave this block out of SAT's targets"
        )
    adapters = sorted(module.lora_A.keys())
    return Projection(
        module.get_base_layer(),
        [module.lora_A[a] for a in adapters],
        [module.lora_B[a] for a in adapters],
        signature(module),
    )


def unsliceable_reason(projections: dict[str, Projection]) -> str | None:
    """Why these projections cannot be sliced (a quantised or unknown layer type), or None."""
    odd = [f"{a}: {type(p.base).__name__}" for a, p in projections.items() if not is_sliceable(p.base)]
    odd += [
        f"{a} adapter: {type(m).__name__}"
        for a, p in projections.items()
        for m in (*p.lora_in, *p.lora_out)
        if not is_sliceable(m)
    ]
    return ", ".join(odd) or None
