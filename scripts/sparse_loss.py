"""The cheap first check of a SAT recipe: how much does omitting units hurt, forward only?

For a scenario's model and training data, measures on ``--batches`` batches:

* the loss of the dense model and, per SAT variant (metric x rate, plus ``--variants`` changes
  such as ``dense_layers=[0,1,2,-1]`` or ``targets=[mlp,attention]``), the loss of the sparse
  network SAT would train on that batch (training mode, the kept set drawn from the batch itself,
  exactly as in a training step, no weight update);
* per layer, the Spearman rank correlation between each metric's scores and every unit's *actual
  contribution* on the batch: the norm of its term in the output projection, ``||h_j|| *
  ||W_out[:, j]||`` for an MLP channel (h: the output projection's input) and
  ``||h_g W_out[:, g]^T||`` for an attention KV group (all its query heads' columns).

A metric that ranks units no better than chance shows a correlation near 0 and a sparse loss
near ``uniform``'s. Minutes on a CPU for SmolLM2-135M. Rows are appended to ``--json``.

A variant with ``layer_rates=auto`` is calibrated first on the ``--batches`` batches that follow
the measured ones (``rate`` is then its FLOP budget, as ``omission_rate`` is in training).

A variant with ``omit_in=backward`` or ``weight_gradient`` has the dense model's loss by construction
(its forward is dense), so for it the check is the *gradient error* instead: the cosine between SAT's gradient
(omitted units' backward paths cut) and the dense gradient over all trainable weights, and the
norm of their difference relative to the dense gradient's, averaged over the batches.

Examples:
    python scripts/sparse_loss.py --config configs/smollm2_cpt.yaml
    python scripts/sparse_loss.py --config configs/smollm2_cpt.yaml --metrics activation --rates 0.5 \\
        --variants default dense_layers=[0,1,2,-1] activation_tokens=64 targets=[mlp,attention]
    python scripts/sparse_loss.py --config configs/smollm2_cpt.yaml --metrics activation uniform --rates 0.5 0.75 \\
        --variants omit_in=backward,dense_layers=[] --no-correlation
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from quality import task_of, variant_overrides  # scripts/quality.py: the same scenario and variant syntax

from sat_trainer import SATConfig, apply_sat, remove_sat
from sat_trainer.app import data as sat_data
from sat_trainer.app.builtin_models import resolve_model_path
from sat_trainer.app.run_config import load_run_config
from sat_trainer.calibration import calibrate
from sat_trainer.config import METRICS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smollm2_cpt.yaml")
    p.add_argument("--batches", type=int, default=2, help="batches of the training set (per_device_train_batch_size blocks each)")
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument(
        "--variants", nargs="+", default=["default"], help="default (the config's sat: block) or k=v[,k=v] changes to it"
    )
    p.add_argument("--no-correlation", action="store_true", help="skip the per-layer rank correlations")
    p.add_argument("--json", default="docs/journal/bench/sparse_loss.jsonl")
    args = p.parse_args(argv)

    task = task_of(args.config)
    cfg = load_run_config(task, args.config, ["training.output_dir=runs/sparse_loss"])
    model_path = resolve_model_path(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    train_set, _, collator = sat_data.build_datasets(task, cfg.data, tokenizer)
    size = cfg.training.get("per_device_train_batch_size", 8)
    everything = [collator([train_set[i] for i in range(b * size, (b + 1) * size)]) for b in range(2 * args.batches)]
    batches, calibration_batches = everything[: args.batches], everything[args.batches :]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path).train()  # no dropout in these models
    torch.set_grad_enabled(False)

    dense = statistics.mean(model(**b).loss.item() for b in batches)
    print(f"{args.config}: {model_path}, {args.batches} x {size} sequences; dense loss {dense:.3f}\n")
    rows, dense_grads = [], []
    for variant in args.variants:
        base = sat_block(task, args.config, variant)
        for metric in args.metrics:
            for rate in args.rates:
                start = time.perf_counter()
                sat = SATConfig.from_dict(base | {"metric": metric, "omission_rate": rate})
                row = {"config": args.config, "variant": variant, "metric": metric, "rate": rate, "dense_loss": round(dense, 4)}
                if sat.omit_in != "forward_backward":
                    dense_grads = dense_grads or [gradient(model, b) for b in batches]
                    cosine, error = gradient_error(model, batches, dense_grads, sat, rate, calibration_batches)
                    row |= {"grad_cosine": round(cosine, 4), "grad_rel_error": round(error, 4)}
                    print(
                        f"  {variant:>24} {metric:>10} rate {rate:<5} gradient cosine {cosine:.4f}, relative error {error:.4f}",
                        flush=True,
                    )
                else:
                    row["sparse_loss"] = round(sparse_loss(model, batches, sat, rate, calibration_batches), 4)
                    print(f"  {variant:>24} {metric:>10} rate {rate:<5} sparse loss {row['sparse_loss']:.3f}", flush=True)
                rows.append(row | {"seconds": round(time.perf_counter() - start, 1)})
    if any("sparse_loss" in r for r in rows):
        print("\n" + loss_table([r for r in rows if "sparse_loss" in r], dense))
    if any("grad_cosine" in r for r in rows):
        print("\n" + loss_table([r for r in rows if "grad_cosine" in r], dense, "grad_cosine"))
    if not args.no_correlation:
        every_block = sat_block(task, args.config, "default") | {"targets": ["mlp", "attention"]}
        corr = correlations(model, batches[0], every_block, args.metrics)
        rows += [{"config": args.config, "correlation": c} for c in corr]
        print("\n" + correlation_table(corr))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def sat_block(task: str, config: str, variant: str) -> dict:
    """The scenario's ``sat:`` settings changed as ``variant`` says (the schedule is irrelevant here)."""
    _, overrides = variant_overrides(variant)
    return load_run_config(task, config, ["training.output_dir=runs/sparse_loss", *overrides]).sat.to_dict()


@contextlib.contextmanager
def patched(model: torch.nn.Module, sat: SATConfig, rate: float, calibration_batches: list[dict] | None = None):
    """``model`` under SAT at ``rate`` (``layer_rates: auto`` first calibrated on ``calibration_batches``,
    as at train start), unpatched again afterwards."""
    handle = apply_sat(model, sat)
    try:
        if sat.layer_rates == "auto":
            with torch.enable_grad():
                calibrate(handle, model, calibration_batches)
        handle.set_rate(rate)
        yield handle
    finally:
        remove_sat(model)


def sparse_loss(
    model: torch.nn.Module, batches: list[dict], sat: SATConfig, rate: float, calibration_batches: list[dict] | None = None
) -> float:
    """Mean loss of the sparse network at ``rate``, each batch drawing its own kept set."""
    with patched(model, sat, rate, calibration_batches) as handle:
        losses = []
        for batch in batches:
            handle.new_step()
            losses.append(model(**batch).loss.item())
        return statistics.mean(losses)


def gradient(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The loss gradient over all trainable weights, flattened."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        model(**batch).loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def gradient_error(
    model: torch.nn.Module,
    batches: list[dict],
    dense_grads: list[torch.Tensor],
    sat: SATConfig,
    rate: float,
    calibration_batches: list[dict] | None = None,
) -> tuple[float, float]:
    """Mean over batches of (cosine, relative L2 error) of SAT's gradient against the dense one."""
    with patched(model, sat, rate, calibration_batches) as handle:
        cosines, errors = [], []
        for batch, full in zip(batches, dense_grads):
            handle.new_step()
            kept = gradient(model, batch)
            kept64, full64 = kept.double(), full.double()  # float32 dot products of 1e8 entries drift past 1
            cosines.append((kept64 @ full64 / (kept64.norm() * full64.norm())).item())
            errors.append(((kept - full).norm() / full.norm()).item())
        return statistics.mean(cosines), statistics.mean(errors)


def correlations(model: torch.nn.Module, batch: dict, sat: dict, metrics: list[str]) -> list[dict]:
    """Per block and metric: Spearman correlation of the metric's scores with the actual contribution."""
    handle = apply_sat(model, SATConfig.from_dict(sat))
    units = handle.units
    remove_sat(model)
    inputs, hidden = {}, {}
    hooks = []
    for u in units:
        hooks.append(u.inputs[0].register_forward_pre_hook(lambda m, a, u=u: inputs.__setitem__(u.name, a[0])))
        hooks.append(u.output.register_forward_pre_hook(lambda m, a, u=u: hidden.__setitem__(u.name, a[0])))
    model(**batch)
    for h in hooks:
        h.remove()
    out = []
    for u in units:
        actual = contribution(hidden[u.name], u.output.weight, u.n)
        for metric in metrics:
            handle = apply_sat(model, SATConfig.from_dict(sat | {"metric": metric}))
            unit = next(v for v in handle.units if v.name == u.name)
            scores = unit.scorer.scores(inputs[u.name], torch.Generator().manual_seed(0))
            remove_sat(model)
            out.append({"block": u.name, "kind": u.kind, "metric": metric, "spearman": round(spearman(scores, actual), 3)})
    return out


def contribution(h: torch.Tensor, out_weight: torch.Tensor, n: int) -> torch.Tensor:
    """Per unit: the norm over tokens of its term ``h[:, unit] @ W_out[:, unit]^T`` in the output projection."""
    flat = h.reshape(-1, h.shape[-1]).float()
    w = out_weight.float()
    chunk = flat.shape[1] // n
    return (
        torch.stack([(flat[:, g * chunk : (g + 1) * chunk] @ w[:, g * chunk : (g + 1) * chunk].t()).norm() for g in range(n)])
        if chunk > 1
        else flat.norm(dim=0) * w.norm(dim=0)
    )


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.float().argsort().argsort().float(), b.float().argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def loss_table(rows: list[dict], dense: float, value: str = "sparse_loss") -> str:
    rates = sorted({r["rate"] for r in rows})
    title = (
        f"sparse-network loss (dense {dense:.3f})"
        if value == "sparse_loss"
        else "gradient cosine with the dense gradient (omit_in backward)"
    )
    lines = [title, "| variant | metric | " + " | ".join(f"rate {r}" for r in rates) + " |", "|---|---|" + "---|" * len(rates)]
    for key in dict.fromkeys((r["variant"], r["metric"]) for r in rows):
        cells = {r["rate"]: f"{r[value]:.3f}" for r in rows if (r["variant"], r["metric"]) == key}
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells.get(r, "") for r in rates) + " |")
    return "\n".join(lines)


def correlation_table(corr: list[dict]) -> str:
    lines = [
        "Spearman correlation with the actual contribution, over blocks: median [min, max]",
        "| kind | metric | median | min | max |",
        "|---|---|---|---|---|",
    ]
    for key in dict.fromkeys((c["kind"], c["metric"]) for c in corr):
        values = [c["spearman"] for c in corr if (c["kind"], c["metric"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
