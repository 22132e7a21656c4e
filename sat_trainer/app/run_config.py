"""The scenario YAML of `sat-train cpt|sft|pretrain`: model, data, training arguments, SAT or LTE, LoRA.

One file per scenario (``configs/<scenario>.yaml``)::

    model: builtin:base            # builtin:base (the embedded pretrained base), a local folder or a hub name
    data:
      train: builtin:shakespeare-continual
      eval: {continual: builtin:shakespeare-continual, base: builtin:shakespeare-base}
      max_length: 256              # CPT: packed block length; SFT: truncation length
      curve_eval_samples: 8        # optional: a cheaper held-out subset for the curves' points
    training: {max_steps: 200, learning_rate: 3.0e-4, ...}   # transformers.TrainingArguments
    sat: {omission_rate: 0.5, ...}                            # SATConfig; omit or `sat: null` for dense
    lte: {expert_size: 32, ...}                               # LTEConfig, instead of sat: (experimental)
    lora: {r: 16, target_modules: [...]}                      # optional peft.LoraConfig fields
    max_skipped_steps: 0           # optimizer steps with a non-finite gradient skipped before the run stops

`sat-train pretrain` (pre-training from scratch) takes the same file with a ``model:`` *shape* instead of a
checkpoint (``{shape: llama-10m, vocab_size: 8192, ...}``, :mod:`.shapes`) and CPT's packed data;
``data.max_train_tokens`` caps the training tokens (``builtin:python-source`` is tokenised only that far).

Everything is validated before any model or data is loaded, cheapest first (the YAML, the
SAT or LTE settings, the model folder and data files, the fit of ``max_length``, ``dense_layers``
and LTE's ``expert_size`` to the model (:mod:`.model_fit`), then ``LoraConfig`` and ``TrainingArguments`` field types and
ranges (:mod:`.fields`, :mod:`.ranges`), which need transformers): each error is one line
naming the key, the value and what is allowed. ``--set section.key=value`` overrides (values parsed as YAML).

``sat:`` and ``lte:`` together are refused: both rewrite the forward of the same MLPs (SAT omits neurons per
optimizer step to train faster, LTE routes them per token to serve faster), and ``apply_lte`` refuses a model SAT
has patched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import SATConfig
from ..errors import SATConfigError, SATError
from ..lte.config import LTEConfig
from ..yaml_io import load_yaml_file, parse_value
from .model_fit import check_fit, check_lte_fit
from .model_source import check_model_spec
from .ranges import LORA, check_section, ints
from .shapes import check_shape_spec, known_config

TASKS = ("cpt", "sft", "pretrain")
SECTIONS = ("model", "data", "training", "sat", "lte", "lora", "max_skipped_steps")
DATA_RANGES = {
    "max_length": ints(8),
    "max_train_samples": ints(1, nullable=True),
    "max_train_tokens": ints(1, nullable=True),
    "max_eval_samples": ints(1, nullable=True),
    "curve_eval_samples": ints(1, nullable=True),
}


@dataclass
class DataConfig:
    train: str = field(metadata={"help": "Training data: builtin:<name>, a local file/folder, or a hub dataset name."})
    eval: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Held-out sets by name ({name: spec}); builtin sets use their validation split."},
    )
    max_length: int = field(default=256, metadata={"help": "CPT: packed block length. SFT: truncation length."})
    text_field: str = field(default="text", metadata={"help": "Column holding raw text (CPT, local/hub data)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap on training blocks (CPT) or records (SFT); None: all."}
    )
    max_train_tokens: int | None = field(
        default=None,
        metadata={
            "help": "CPT and pretrain: the training blocks of the first this many tokens (a stream corpus such as "
            "builtin:python-source is tokenised only that far); more than the data holds is refused. None: all."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Cap on blocks (CPT) or records (SFT) per held-out set."}
    )
    curve_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Blocks or records per held-out set at each point of the curves (evenly spaced over the set); "
            "the run's final held-out losses use the whole set. None: every point uses the whole set."
        },
    )


@dataclass
class RunConfig:
    task: str
    model: str | dict[str, Any]  # pretrain: a checked shape mapping (:mod:`.shapes`)
    data: DataConfig
    training: dict[str, Any]
    sat: SATConfig | None
    lora: dict[str, Any] | None = None
    source: str = "<dict>"
    max_skipped_steps: int = 0
    lte: LTEConfig | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.training["output_dir"])


def load_run_config(task: str, path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a scenario YAML; raises :class:`SATConfigError` on any bad key."""
    path = Path(path)
    raw = load_yaml_file(path) or {}
    if not isinstance(raw, dict):
        raise SATConfigError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    try:
        return build_run_config(task, raw, source=str(path))
    except SATConfigError as err:
        raise SATConfigError(f"{path}: {err}") from None


def build_run_config(task: str, raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a scenario mapping, cheap checks first (transformers and peft are imported last)."""
    from .training_args import check_training

    if task not in TASKS:
        raise SATConfigError(f"task {task!r} is not one of {', '.join(TASKS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise SATConfigError(f"unknown top-level key {unknown[0]!r}; allowed: {', '.join(sorted(SECTIONS))}")
    sat = None if raw.get("sat") is None else SATConfig.from_dict(raw["sat"])
    lte = None if raw.get("lte") is None else LTEConfig.from_dict(raw["lte"])
    if sat is not None and lte is not None:
        raise SATConfigError(
            "sections 'sat' and 'lte' cannot be combined: both rewrite the same MLPs' forward (SAT omits neurons per "
            "step to train faster, LTE routes them per token to serve faster); keep one, or set the other to null"
        )
    data = _data_config(raw.get("data"), task)
    if task == "pretrain":
        shape = check_shape_spec(raw.get("model"))
        if lte is not None:
            raise SATConfigError("section 'lte' cannot be used by sat-train pretrain: LTE adapts a pretrained model's MLPs")
        known = known_config(shape, data.max_length)
    else:
        known = check_model_spec(raw.get("model"), sat=sat is not None, lte=lte is not None)
    if known is not None:
        check_fit(known, raw["model"], max_length=data.max_length, dense_layers=sat.dense_layers if sat is not None else None)
        if lte is not None:
            check_lte_fit(known, raw["model"], lte)
    skipped = ints(0).check("max_skipped_steps", raw.get("max_skipped_steps", 0))
    lora = _lora(raw.get("lora"))
    training = check_training(raw.get("training") or {}, has_eval=bool(data.eval))
    return RunConfig(task, raw["model"], data, training, sat, lora, source, skipped, lte)


def _apply_override(raw: dict, item: str) -> None:
    """``a.b.c=value``: set a nested key, the value parsed as YAML (so 0.3, true, [a, b] work)."""
    if "=" not in item:
        raise SATConfigError(f"--set {item!r}: expected key=value, e.g. training.max_steps=10")
    key, value = item.split("=", 1)
    *parents, leaf = key.strip().split(".")
    if not all((*parents, leaf)):
        raise SATConfigError(f"--set {item!r}: {key!r} is not a dotted key, e.g. training.max_steps=10")
    node = raw
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise SATConfigError(f"--set {item!r}: {part!r} is not a section")
    node[leaf] = parse_value(value, f"--set {item!r}")


def _data_config(raw: Any, task: str) -> DataConfig:
    if not isinstance(raw, dict):
        raise SATConfigError(f"key 'data' has invalid value {raw!r}; allowed: a mapping with at least 'train'")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SATConfigError(f"unknown key 'data.{unknown[0]}'; allowed: {', '.join(sorted(known))}")
    if not isinstance(raw.get("train"), str):
        raise SATConfigError(f"key 'data.train' has invalid value {raw.get('train')!r}; allowed: a dataset spec string")
    evals = raw.get("eval") or {}
    if isinstance(evals, str):
        evals = {"eval": evals}
    if not isinstance(evals, dict) or not all(isinstance(v, str) for v in evals.values()):
        raise SATConfigError(f"key 'data.eval' has invalid value {evals!r}; allowed: a spec string or {{name: spec}}")
    max_length = raw.get("max_length", 256)
    for key, allowed in DATA_RANGES.items():
        allowed.check(f"data.{key}", max_length if key == "max_length" else raw.get(key))
    text_field = raw.get("text_field", "text")
    if not isinstance(text_field, str) or not text_field:
        raise SATConfigError(f"key 'data.text_field' has invalid value {text_field!r}; allowed: a column name")
    from .data import PACKED
    from .data.loading import check, is_stream
    from .data.preflight import check_local

    if task not in PACKED and raw.get("max_train_tokens") is not None:
        raise SATConfigError(
            f"key 'data.max_train_tokens' has invalid value {raw['max_train_tokens']!r}; allowed: null for sft "
            "(it caps packed tokens; data.max_train_samples caps records)"
        )
    for key, spec in [("data.train", raw["train"]), *((f"data.eval.{n}", s) for n, s in evals.items())]:
        try:
            if check(spec) == "local":
                check_local(Path(spec).expanduser(), task, text_field)
            elif task not in PACKED and is_stream(spec):
                raise SATError(f"{spec} is a pre-training corpus (raw text); allowed for cpt and pretrain, not {task}")
        except SATError as err:
            raise SATConfigError(f"key {key!r}: {err}") from None
    return DataConfig(**{**raw, "eval": evals, "max_length": max_length})


def _lora(raw: Any) -> dict[str, Any] | None:
    """Field names and types of ``peft.LoraConfig`` (the rest is checked on the model, see model_source)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise SATConfigError(f"key 'lora' has invalid value {raw!r}; allowed: a mapping of peft.LoraConfig fields")
    try:
        import peft
    except ImportError:
        raise SATConfigError("key 'lora' needs peft: pip install 'sat_trainer[peft]'") from None
    from .fields import check_fields

    lora = check_fields(raw, peft.LoraConfig, "lora")
    check_section(lora, LORA, "lora")
    if lora.get("use_dora"):
        raise SATConfigError("key 'lora.use_dora' has invalid value True; allowed: false (SAT cannot slice DoRA)")
    return lora
