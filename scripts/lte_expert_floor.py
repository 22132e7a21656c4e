"""The floor of LTE-style routing by expert size: held-out loss of a dense model when each token keeps only the
experts whose activations have the largest norm.

No router of a given expert size can pick better for a token than its own activations do, so this is the quality a
trained LTE model of that expert size can at best reach at that fraction; expert size 1 is the per-neuron top-k.
Reads the held-out sets of the run's config (``report.json``), as ``scripts/lte_quality.py`` does; the loss is the
mean over every label token of a set.

Experts are grouped as LTE groups them (balanced k-means of the gate and up rows: ``--grouping weights``) and, with
``--grouping coactivation``, by which tokens each neuron is large on (:func:`sat_trainer.lte.experts.coactivation_features`).
``--fitted-router`` adds, per expert size, what the library's own router reaches before any training: LTE applied
with ``router_init: activations``, fitted on the calibration records, selecting at threshold 0.5 (so the fraction
is the one it reaches, near the one asked). Both need ``--calibration-records``: the first N records of each
held-out set are then used to group or fit, and every row (dense too) is measured on the rest.

    python scripts/lte_expert_floor.py runs/smollm2_lte_sft/dense --expert-sizes 1 2 8 32 --fraction 0.5 --json rows.json
    python scripts/lte_expert_floor.py runs/smollm2_lte_sft/dense --expert-sizes 1 8 32 --calibration-records 60 \\
        --grouping weights coactivation --fitted-router --json rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lte_quality import eval_data, held_out_loss, load_model  # noqa: E402

from sat_trainer import LTEConfig, apply_lte  # noqa: E402
from sat_trainer.lte.baselines import TopKExperts, TopKMask  # noqa: E402
from sat_trainer.lte.experts import coactivation_features  # noqa: E402
from sat_trainer.lte.fit import each_mlp_input  # noqa: E402
from sat_trainer.lte.measure import ActiveMeter, gated_mlps  # noqa: E402
from sat_trainer.lte.router import gated_activation  # noqa: E402


def split_sets(sets: dict, records: int) -> tuple[dict, dict]:
    """({name: the first ``records`` records}, {name: the rest}) of each held-out set."""
    for name, dataset in sets.items():
        if len(dataset) <= records:
            raise SystemExit(f"--calibration-records {records}: held-out set {name!r} has only {len(dataset)} records")
    return (
        {name: ds.select(range(records)) for name, ds in sets.items()},
        {name: ds.select(range(records, len(ds))) for name, ds in sets.items()},
    )


def batches_of(sets: dict, collator, batch_size: int) -> list[dict]:
    """Every record of ``sets`` collated in batches, labels dropped (what a calibration forward takes)."""
    out = []
    for dataset in sets.values():
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out.append({k: v for k, v in batch.items() if k != "labels"})
    return out


def activation_profiles(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Per gated MLP name, :func:`coactivation_features` of its ``act(gate) * up`` over the batches' real tokens."""
    blocks = gated_mlps(model)
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]

    def collect(index: int, rows: torch.Tensor) -> None:
        _, shape, block = blocks[index]
        seen[index].append(gated_activation(block, shape, rows))

    each_mlp_input(model, [block for _, _, block in blocks], batches, collect)
    return {name: coactivation_features(torch.cat(hs)) for (name, _, _), hs in zip(blocks, seen)}


def fitted_router_row(model, size: int, calibration: list[dict], sets, collator, batch_size, dense) -> dict:
    """The library's router fitted to the activations (``router_init: activations``), untrained, at threshold 0.5."""
    handle = apply_lte(model, LTEConfig(expert_size=size, router_init="activations"))
    try:
        handle.fit_routers(calibration)
        handle.set_stage("hard")
        with ActiveMeter(model, handle) as meter:
            loss = held_out_loss(model, sets, collator, batch_size)
    finally:
        handle.remove()
    fraction = meter.summary()["routed_fraction"]
    change = {name: value / dense[name] - 1 for name, value in loss.items()}
    return {"expert_size": size, "router": "fitted", "fraction": fraction, "held_out_loss": loss, "vs_dense": change}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a dense run folder (its final/ and report.json)")
    p.add_argument("--expert-sizes", type=int, nargs="+", default=[1, 2, 8, 32])
    p.add_argument("--fraction", type=float, default=0.5, help="of each MLP's experts kept per token, in (0, 1]")
    p.add_argument("--max-eval-samples", type=int, help="cap on records per held-out set (default: the run's)")
    p.add_argument("--grouping", nargs="+", choices=["weights", "coactivation"], default=["weights"])
    p.add_argument("--fitted-router", action="store_true", help="also the library's router fitted, untrained")
    p.add_argument("--calibration-records", type=int, default=0, help="records per held-out set to group or fit on")
    p.add_argument("--json", type=Path, help="write the rows here (a JSON list)")
    args = p.parse_args(argv)
    needs_calibration = args.fitted_router or "coactivation" in args.grouping
    if needs_calibration and args.calibration_records < 1:
        raise SystemExit("--grouping coactivation and --fitted-router need --calibration-records N (N >= 1)")
    sets, collator, batch_size = eval_data(args.run, args.max_eval_samples)
    model = load_model(args.run / "final")
    calibration, profiles = [], None
    if args.calibration_records:
        calibration_sets, sets = split_sets(sets, args.calibration_records)
        calibration = batches_of(calibration_sets, collator, batch_size)
        if "coactivation" in args.grouping:
            profiles = activation_profiles(model, calibration)
    dense = held_out_loss(model, sets, collator, batch_size)
    rows = [{"expert_size": None, "fraction": 1.0, "held_out_loss": dense}]
    print(f"dense: {dense}", flush=True)
    for size in args.expert_sizes:
        masks = {"top-k": TopKMask(model, args.fraction)} if size == 1 else {}
        for grouping in args.grouping if size > 1 else []:
            features = profiles if grouping == "coactivation" else None
            masks[f"oracle, {grouping}"] = TopKExperts(model, args.fraction, size, features=features)
        for label, mask in masks.items():
            with mask:
                loss = held_out_loss(model, sets, collator, batch_size)
            change = {name: value / dense[name] - 1 for name, value in loss.items()}
            rows.append(
                {
                    "expert_size": size,
                    "router": label,
                    "fraction": mask.kept_fraction(),
                    "held_out_loss": loss,
                    "vs_dense": change,
                }
            )
            print(f"expert size {size}, {label}: kept {mask.kept_fraction():.3f}, {loss}, vs dense {change}", flush=True)
        if args.fitted_router:
            row = fitted_router_row(model, size, calibration, sets, collator, batch_size, dense)
            rows.append(row)
            print(f"expert size {size}, fitted router: kept {row['fraction']:.3f}, vs dense {row['vs_dense']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
