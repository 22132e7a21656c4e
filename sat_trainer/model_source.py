"""Where a scenario's model comes from, and what can be checked about it before weights load.

``model:`` is ``builtin:<name>``, a local folder or a hub name. A spec that looks like a path
(starts with ``./``, ``../``, ``/`` or ``~``, or names an existing folder's child) is local: it
must exist and hold a ``config.json`` (otherwise transformers would try the hub for a minute
and then print a traceback). Two stages:

* :func:`check_model_spec` (config time, no imports beyond json): the builtin name exists, the
  local folder is a model, and its ``model_type`` is one SAT supports;
* :func:`check_model` (run time, before data is tokenised): the same ``model_type`` check for
  builtins and hub models through ``AutoConfig``, and the LoRA section applied to the model
  built on the meta device (no memory, no weights), so unknown ``target_modules`` fail first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .builtin_models import MODEL_BUILTINS, PREFIX, check_builtin, is_builtin
from .errors import SATConfigError, SATError
from .patch.registry import FAMILIES, supported_model_types


def is_local(spec: str) -> bool:
    path = Path(spec).expanduser()
    return spec.startswith(("./", "../", "/", "~")) or spec in (".", "..") or path.exists() or (
        path.parent != Path(".") and path.parent.is_dir()
    )


def check_model_spec(spec: Any, *, sat: bool) -> None:
    """Raise :class:`SATConfigError` for a model spec that cannot load (no weights are read)."""
    if not isinstance(spec, str) or not spec:
        raise SATConfigError(
            f"key 'model' has invalid value {spec!r}; allowed: {', '.join(PREFIX + n for n in MODEL_BUILTINS)}, "
            "a local model folder or a hub name"
        )
    try:
        if is_builtin(spec):
            check_builtin(spec)
        elif is_local(spec):
            check_model_type(_local_model_type(Path(spec).expanduser()), spec, sat=sat)
    except SATError as err:
        raise SATConfigError(f"key 'model': {err}") from None


def check_model_type(model_type: str | None, source: str, *, sat: bool) -> None:
    if sat and model_type not in FAMILIES:
        raise SATError(
            f"model_type {model_type!r} of {source} is not supported by SAT; supported: "
            f"{', '.join(supported_model_types())} (or set sat: null to train it dense)"
        )


def check_model(path: str, *, sat: bool, lora: dict[str, Any] | None) -> None:
    """Run-time checks before data is tokenised: model_type through AutoConfig, LoRA on the meta device."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SATConfigError(f"key 'model': {path} cannot be loaded: {str(err).splitlines()[0]}") from None
    try:
        check_model_type(config.model_type, path, sat=sat)
    except SATError as err:
        raise SATConfigError(f"key 'model': {err}") from None
    if lora is not None:
        check_lora(config, lora)


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


def _local_model_type(folder: Path) -> str | None:
    if not folder.exists():
        raise SATError(f"local model folder not found: {folder}")
    config = folder / "config.json"
    if not config.is_file():
        raise SATError(f"{folder} is not a model folder (no config.json); allowed: a folder written by save_pretrained")
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as err:
        raise SATError(f"{config} is not a valid model config: {err}") from None
