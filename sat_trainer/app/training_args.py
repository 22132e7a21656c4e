"""The ``training:`` section of a scenario -> ``transformers.TrainingArguments``, built up front.

Building the arguments while the config is validated (not after the model and data loaded)
makes ``TrainingArguments``' own checks (enum values, strategy combinations) fail first, with
one line. ``sat-train`` fills in what a run folder and its report need when left unset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SATConfigError
from .fields import check_fields
from .ranges import TRAINING, check_section

if TYPE_CHECKING:
    from transformers import TrainingArguments


def check_training(raw: Any, *, has_eval: bool) -> dict[str, Any]:
    """The section with numeric strings coerced; raises :class:`SATConfigError` on any bad value
    (wrong type, out of range, or held-out evaluation asked for without held-out sets)."""
    from transformers import TrainingArguments

    if not isinstance(raw, dict):
        raise SATConfigError(f"key 'training' has invalid value {raw!r}; allowed: a mapping of TrainingArguments fields")
    training = check_fields(raw, TrainingArguments, "training")
    check_section(training, TRAINING, "training")
    if not training.get("output_dir"):
        raise SATConfigError("key 'training.output_dir' is missing; allowed: a folder for checkpoints and the report")
    training_arguments(training, has_eval=has_eval, output_dir=training["output_dir"])
    strategy = training.get("eval_strategy")
    if not has_eval and strategy not in (None, "no"):  # the Trainer would refuse it once the model loaded
        raise SATConfigError(
            f"key 'training.eval_strategy' has invalid value {strategy!r}: data.eval names no held-out set; allowed: no (or add data.eval)"
        )
    return training


def training_arguments(training: dict[str, Any], *, has_eval: bool, output_dir: str, resumed: bool = False) -> TrainingArguments:
    """The run's arguments: the scenario's values, ``output_dir`` set, and these defaults when unset:
    no reporting integrations, a log every 10 steps, token counting (tokens/s), a checkpoint every
    ``save_steps`` if given (else none), and, when there are held-out sets, 10 evaluations plus one
    before the first step (``eval_on_start``: the curves start at the model trained from; a resumed
    run has that point in its record already and does not evaluate again)."""
    from transformers import TrainingArguments

    args = dict(training)
    args["output_dir"] = str(output_dir)
    args.pop("resume_from_checkpoint", None)  # sat-train passes it to train(); the Trainer ignores the field
    args.setdefault("report_to", [])
    args.setdefault("logging_steps", 10)
    args.setdefault("include_num_input_tokens_seen", True)
    args.setdefault("save_strategy", "steps" if "save_steps" in args else "no")
    if has_eval:
        args.setdefault("eval_strategy", "steps")
        args.setdefault("eval_steps", max(1, int(args.get("max_steps", 100)) // 10))
        args.setdefault("eval_on_start", not resumed)
    try:
        return TrainingArguments(**args)
    except (ValueError, TypeError) as err:
        raise SATConfigError(f"key 'training': {' '.join(str(err).split())}") from None
