"""LTE in a `sat-train` run (an ``lte:`` section): the held-out measurement of the model as served, and its lines.

The run trains with :class:`~sat_trainer.lte.callback.LTECallback` (both stages in one Trainer run; its
checkpoints hold the routers too). After the last step, :func:`held_out_sparsity` switches to stage hard (what
``load_lte`` serves, whatever stage training ended in) and evaluates each whole held-out set once with an
:class:`~sat_trainer.lte.measure.ActiveMeter` on: that evaluation gives the report's held-out losses (the Trainer's
``whole`` prefix, as a run whose curves use a subset gets) and the fraction of MLP neurons computed per token, per
layer and on average, over the same tokens (padding left out). ``report.json`` keeps it under ``lte``;
:func:`summary_lines` is what the console prints.
"""

from __future__ import annotations

from typing import Any

from ..lte.measure import ActiveMeter
from .report import FULL_EVAL_PREFIX


def held_out_sparsity(trainer: Any, handle: Any, eval_sets: dict[str, Any]) -> dict[str, Any]:
    """Evaluate every held-out set whole in stage hard, counting the neurons computed per token.

    Args:
        trainer: the run's ``transformers.Trainer`` (its evaluations are logged like the run's own).
        handle: the model's :class:`~sat_trainer.lte.model.LTEHandle`.
        eval_sets: ``{name: dataset}``, the run's whole held-out sets.

    Returns:
        the report's ``lte`` entry: ``stage``, ``threshold``, ``dense_layers`` and per set ``held_out``:
        ``loss``, ``mlp_fraction`` (of all MLP neurons, computed per token on average), ``routed_fraction`` (of
        the routed MLPs' neurons), ``layers`` (each MLP's fraction; 1 where it has no router) and ``tokens``.
    """
    handle.set_stage("hard")
    held_out = {}
    for name, dataset in eval_sets.items():
        with ActiveMeter(trainer.model, handle) as meter:
            metrics = trainer.evaluate(eval_dataset={name: dataset}, metric_key_prefix=FULL_EVAL_PREFIX)
        held_out[name] = {"loss": metrics.get(f"{FULL_EVAL_PREFIX}_{name}_loss"), **meter.summary()}
    return {
        "stage": "hard",
        "threshold": handle.threshold,
        "dense_layers": list(handle.config.dense_layers),
        "held_out": held_out,
    }


def summary_lines(lte: dict[str, Any]) -> list[str]:
    """The console's lines of a report's ``lte`` entry: per held-out set, the fraction of MLP neurons computed per
    token on average (and skipped), the held-out loss, and the fraction per layer."""
    if not lte.get("held_out"):
        return ["LTE: no held-out set (data.eval), so the neurons computed per token were not measured"]
    lines = []
    for name, row in lte["held_out"].items():
        if row["mlp_fraction"] is None:
            lines.append(f"LTE, held-out {name}: no token counted")
            continue
        lines.append(
            f"LTE, stage hard (threshold {lte['threshold']:g}), held-out {name}: {100 * row['mlp_fraction']:.1f}% of MLP "
            f"neurons computed per token ({100 * (1 - row['mlp_fraction']):.1f}% skipped), held-out loss {row['loss']:.4f}"
        )
        per_layer = ", ".join(f"{layer}: {fraction:.3f}" for layer, fraction in row["layers"].items())
        lines.append(f"  per layer (fraction computed; 1 = no router): {per_layer}")
    return lines
