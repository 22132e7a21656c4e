"""Where a scenario's model comes from, and what can be checked about it before weights load.

``model:`` is ``builtin:<name>``, a local folder or a hub name. A spec that looks like a path
(starts with ``./``, ``../``, ``/`` or ``~``, or names an existing folder's child) is local: it
must exist and hold a ``config.json`` (otherwise transformers would try the hub for a minute
and then print a traceback). Two stages:

* :func:`check_model_spec` (config time, no imports beyond json): the builtin name exists, the
  local folder is a model, and its ``model_type`` is one SAT (or LTE) supports; it returns what is known
  of the model's config (``config.json``, or a builtin's shape) for :mod:`.model_fit`;
* :func:`check_model` (run time, before data is tokenised): the same checks for builtins and
  hub models through ``AutoConfig`` (``model_type``, for LTE a gated MLP, and the scenario's fit to the model), and
  the LoRA section applied to the model built on the meta device (no memory, no weights), so
  unknown ``target_modules`` fail first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SATConfigError, SATError
from ..patch.registry import FAMILIES, supported_model_types
from .builtin_models import MODEL_BUILTINS, PREFIX, builtin_shape, is_builtin
from .model_fit import check_fit

if TYPE_CHECKING:
    from ..config import SATConfig
    from ..lte.config import LTEConfig


def is_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return (
        spec.startswith(("./", "../", "/", "~"))
        or spec in (".", "..")
        or path.exists()
        or (path.parent != Path(".") and path.parent.is_dir())
    )


def check_model_spec(spec: Any, *, sat: bool, lte: bool = False) -> dict[str, Any] | None:
    """Raise :class:`SATConfigError` for a model spec that cannot load (no weights are read).
    Returns the model's config as far as it is known without loading anything (None: a hub model)."""
    if not isinstance(spec, str) or not spec:
        raise SATConfigError(
            f"key 'model' has invalid value {spec!r}; allowed: {', '.join(PREFIX + n for n in MODEL_BUILTINS)}, "
            "a local model folder or a hub name"
        )
    try:
        if is_builtin(spec):
            return builtin_shape(spec)
        if is_local(spec):
            config = _local_config(Path(spec).expanduser())
            check_model_type(config.get("model_type"), spec, sat=sat, lte=lte)
            return config
    except SATError as err:
        raise SATConfigError(f"key 'model': {err}") from None
    return None


def check_model_type(model_type: str | None, source: str, *, sat: bool, lte: bool = False) -> None:
    """Raise :class:`SATError` for a ``model_type`` that SAT (``sat``) or LTE (``lte``) cannot patch; whether an
    LTE model's MLP is gated is checked by :func:`check_model` (it needs torch)."""
    for wanted, kind in ((sat, "sat"), (lte, "lte")):
        if wanted and model_type not in FAMILIES:
            raise SATError(
                f"model_type {model_type!r} of {source} is not supported by {kind.upper()}; supported: "
                f"{', '.join(supported_model_types())} (or set {kind}: null to train it dense)"
            )


def check_model(
    path: str, *, sat: SATConfig | None, lora: dict[str, Any] | None, max_length: int, lte: LTEConfig | None = None
) -> None:
    """Run-time checks before data is tokenised: model_type and the scenario's fit through
    AutoConfig (``sat`` and ``lte``: None unless that run patches the model), LoRA on the meta device."""
    import transformers

    from .model_fit import check_lte_fit

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SATConfigError(f"key 'model': {path} cannot be loaded: {str(err).splitlines()[0]}") from None
    try:
        check_model_type(config.model_type, path, sat=sat is not None, lte=lte is not None)
        if lte is not None:
            _check_gated(config.model_type, path)
    except SATError as err:
        raise SATConfigError(f"key 'model': {err}") from None
    check_fit(config.to_dict(), path, max_length=max_length, dense_layers=sat.dense_layers if sat is not None else None)
    if lte is not None:
        check_lte_fit(config.to_dict(), path, lte)
    if lora is not None:
        check_lora(config, lora)


def _check_gated(model_type: str, source: str) -> None:
    from ..lte.model import gated_model_types

    if model_type not in gated_model_types():
        raise SATError(
            f"model_type {model_type!r} of {source} cannot use LTE: its MLP is not gated (act(gate(x)) * up(x) -> down); "
            f"supported: {', '.join(gated_model_types())} (or set lte: null to train it dense)"
        )


def check_lora(config: Any, lora: dict[str, Any]) -> None:
    """Apply the LoRA section to the model built on the meta device; one line for what peft refuses."""
    import peft
    import torch
    import transformers
    from peft.tuners.tuners_utils import check_target_module_exists

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    lora_config = _peft_call(peft.LoraConfig, task_type="CAUSAL_LM", **lora)
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(lora_config.target_modules, (list, set)) and not any(check_target_module_exists(lora_config, n) for n in names):
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise SATConfigError(
            f"key 'lora.target_modules' has invalid value {lora['target_modules']!r}: it matches no module of this "
            f"{config.model_type} model; linear modules that exist: {', '.join(linear)}"
        )
    _peft_call(peft.get_peft_model, model, lora_config)


def _peft_call(function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except (ValueError, TypeError, KeyError, NotImplementedError) as err:
        raise SATConfigError(f"key 'lora': {' '.join(str(err).split())}") from None


def _local_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise SATError(f"local model folder not found: {folder}")
    config = folder / "config.json"
    if not config.is_file():
        raise SATError(f"{folder} is not a model folder (no config.json); allowed: a folder written by save_pretrained")
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as err:
        raise SATError(f"{config} is not a valid model config: {err}") from None
    if not isinstance(parsed, dict):
        raise SATError(f"{config} is not a valid model config: expected a JSON object, got {type(parsed).__name__}")
    return parsed
