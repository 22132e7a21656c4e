"""The floor of LTE-style routing by expert size: held-out loss of a dense model when each token keeps only the
experts (LTE's grouping: balanced k-means of the gate and up rows) whose activations have the largest norm.

No router of a given expert size can pick better for a token than its own activations do, so this is the quality a
trained LTE model of that expert size can at best reach at that fraction; expert size 1 is the per-neuron top-k.
Reads the held-out sets of the run's config (``report.json``), as ``scripts/lte_quality.py`` does; the loss is the
mean over every label token of a set.

    python scripts/lte_expert_floor.py runs/smollm2_lte_sft/dense --expert-sizes 1 2 8 32 --fraction 0.5 --json rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lte_quality import eval_data, held_out_loss, load_model  # noqa: E402

from sat_trainer.lte.baselines import TopKExperts, TopKMask  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a dense run folder (its final/ and report.json)")
    p.add_argument("--expert-sizes", type=int, nargs="+", default=[1, 2, 8, 32])
    p.add_argument("--fraction", type=float, default=0.5, help="of each MLP's experts kept per token, in (0, 1]")
    p.add_argument("--max-eval-samples", type=int, help="cap on records per held-out set (default: the run's)")
    p.add_argument("--json", type=Path, help="write the rows here (a JSON list)")
    args = p.parse_args(argv)
    sets, collator, batch_size = eval_data(args.run, args.max_eval_samples)
    model = load_model(args.run / "final")
    dense = held_out_loss(model, sets, collator, batch_size)
    rows = [{"expert_size": None, "fraction": 1.0, "held_out_loss": dense}]
    print(f"dense: {dense}", flush=True)
    for size in args.expert_sizes:
        mask = TopKMask(model, args.fraction) if size == 1 else TopKExperts(model, args.fraction, size)
        with mask:
            loss = held_out_loss(model, sets, collator, batch_size)
        change = {name: value / dense[name] - 1 for name, value in loss.items()}
        rows.append({"expert_size": size, "fraction": mask.kept_fraction(), "held_out_loss": loss, "vs_dense": change})
        print(f"expert size {size}: kept {mask.kept_fraction():.3f}, {loss}, vs dense {change}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
