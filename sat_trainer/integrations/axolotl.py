"""SAT in axolotl: ``plugins: [sat_trainer.integrations.axolotl.SATPlugin]`` and a ``sat:`` block.

The ``sat:`` block holds :class:`sat_trainer.SATConfig`'s keys (absent or empty: its defaults) and is
checked with axolotl's own config, so a bad value stops ``axolotl train`` before any model loads, with
SATConfig's message. The plugin hands axolotl a :class:`sat_trainer.SATCallback` before the Trainer
is built (``add_callbacks_pre_trainer``), so SAT patches the model at ``on_init_end`` exactly as in
``Trainer(..., callbacks=[SATCallback(cfg)])``; a callback added after the Trainer exists would miss
that event.

Refused, with one line each (the engine refuses the rest when it patches: DoRA adapters, quantised
or unknown projection layers, ``omitted_update`` freeze/momentum under DeepSpeed):

* a quantised base (``load_in_4bit``, ``load_in_8bit``, ``gptq``, ``adapter: qlora``): SAT slices
  plain dense projections only, so every block would run dense;
* axolotl's fused LoRA kernels (``lora_mlp_kernel``, ``lora_qkv_kernel``, ``lora_o_kernel``): they
  read the projections' weights directly and would bypass SAT's sliced forwards. axolotl turns them
  on by default for LoRA; with this plugin they default to off instead;
* a ``model_type`` SAT has no block layout for, checked before the model loads.
"""

from __future__ import annotations

from typing import Any

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel, field_validator, model_validator

from ..config import SATConfig
from ..errors import SATConfigError, SATError

LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel")
QUANTISED = ("load_in_4bit", "load_in_8bit", "gptq")


class SATArgs(BaseModel):
    """The ``sat:`` block axolotl merges into its config model when the plugin is listed."""

    sat: dict[str, Any] | None = None

    @field_validator("sat", mode="before")
    @classmethod
    def _valid_sat(cls, value: Any) -> Any:
        if value is not None:
            try:
                SATConfig.from_dict(value)
            except SATConfigError as err:
                raise ValueError(f"sat: {err}") from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_conflicts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            reason = conflict(data)
            if reason is not None:
                raise ValueError(reason)
        return data


def conflict(cfg: Any) -> str | None:
    """Why SAT cannot run under this axolotl config (a mapping of its keys), or None."""
    quantised = [key for key in QUANTISED if cfg.get(key)] + (["adapter: qlora"] if cfg.get("adapter") == "qlora" else [])
    if quantised:
        return (
            f"sat_trainer cannot run on a quantised base ({', '.join(quantised)}): SAT slices plain dense projections only, "
            "so every block would run dense; train LoRA on an unquantised base (adapter: lora) or leave the SAT plugin out"
        )
    kernels = [key for key in LORA_KERNELS if cfg.get(key)]
    if kernels:
        return (
            f"sat_trainer cannot run with {', '.join(kernels)}: axolotl's fused LoRA kernels read the projections' weights "
            "directly and would bypass SAT's sliced forwards; set them to false (the SAT plugin's default)"
        )
    return None


class SATPlugin(BasePlugin):
    """axolotl plugin: validates the ``sat:`` block, refuses what SAT cannot run under, and adds
    :class:`sat_trainer.SATCallback` to the Trainer axolotl builds."""

    def get_input_args(self) -> str:
        """The pydantic model axolotl merges into its config: :class:`SATArgs`."""
        return f"{__name__}.SATArgs"

    def register(self, cfg: dict) -> None:
        """Before validation: the fused LoRA kernels, which axolotl enables by default for LoRA, default to off."""
        for key in LORA_KERNELS:
            if cfg.get(key) is None:
                cfg[key] = False

    def pre_model_load(self, cfg) -> None:
        """Refuse a model type SAT has no block layout for before its weights load (``model_config_type``
        is read from the model's config by axolotl's ``normalize_config``)."""
        from ..patch.registry import supported_model_types

        model_type = cfg.get("model_config_type")
        if model_type is not None and model_type not in supported_model_types():
            raise SATError(
                f"model_type {model_type!r} ({cfg.get('base_model')}) is not supported by sat_trainer; "
                f"supported: {', '.join(supported_model_types())}"
            )

    def add_callbacks_pre_trainer(self, cfg, model) -> list:
        """The SAT callback, given to the Trainer's constructor so that it patches ``model`` at ``on_init_end``.

        Returns:
            ``[SATCallback(SATConfig.from_dict(cfg.sat or {}))]``.
        """
        from ..callback import SATCallback

        return [SATCallback(SATConfig.from_dict(dict(cfg.get("sat") or {})))]
