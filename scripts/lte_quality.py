"""LTE quality: held-out loss against the fraction of MLP neurons computed per token, for LTE and two baselines.

Input: the run folder of a `sat-train cpt|sft` run with an ``lte:`` section (its ``final/`` holds the model,
``lte.safetensors`` and ``lte_config.json``), or the folder of ``--compare-dense`` (its ``lte/`` and ``dense/``
runs), or ``--dense`` naming the dense run. The held-out sets are those of the run's config (``report.json``),
built as the run built them; the loss is the mean over every label token of a set (so one number per set, not a
mean of batch means). Rows:

* ``dense``: the dense run's final model, every neuron (only with a dense run);
* ``lte, every neuron``: the LTE run's final weights without routers;
* ``lte`` (a): the LTE model at each ``--thresholds`` value, re-thresholding its trained routers (stage hard,
  the sparse inference path); the fraction is the one reached, counted per token over the held-out sets;
* ``top-k`` (b): training-free per-token top-k of the dense model's own ``|act(gate) * up|`` at each fraction LTE
  reached (and ``--fractions``): a masked forward, quality only (:class:`sat_trainer.lte.baselines.TopKMask`);
* ``top-k experts`` (b'): per token, the experts (LTE's grouping and expert size) whose activations have the
  largest norm (:class:`sat_trainer.lte.baselines.TopKExperts`): the best any router of that expert size could choose;
* ``random`` (c): random experts of LTE's expert size at the same fractions
  (:class:`sat_trainer.lte.baselines.RandomExperts`).

(b) and (c) run on the dense run's final model when there is one, else on the LTE run's weights (each row names
its model), and leave LTE's ``dense_layers`` unmasked, so a fraction of routed neurons means the same in every row.
``fraction`` is of the masked (routed) MLPs' neurons; ``mlp_fraction`` of all MLP neurons (unrouted MLPs count
whole). Output: a markdown table (printed, ``--markdown``), the rows as JSON (``--json``), a plot (``--plot``).

    python scripts/lte_quality.py runs/smollm2_lte_sft --json rows.json --markdown table.md --plot curve.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import transformers

from sat_trainer import LTEConfig, load_lte
from sat_trainer.app.data import build_eval_sets
from sat_trainer.app.run_config import DataConfig
from sat_trainer.lte.baselines import RandomExperts, TopKExperts, TopKMask
from sat_trainer.lte.measure import ActiveMeter, gated_mlps
from sat_trainer.lte.model import CONFIG_NAME
from sat_trainer.lte.router import mlp_width
from sat_trainer.patch.blocks import layer_index

IGNORE = -100
DEFAULT_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)


def run_folders(run: Path, dense: Path | None) -> tuple[Path, Path | None]:
    """(the LTE run folder, the dense run folder or None): ``run`` itself, or its ``lte/`` and ``dense/``."""
    if (run / "lte" / "report.json").is_file():
        return run / "lte", dense or (run / "dense" if (run / "dense" / "report.json").is_file() else None)
    return run, dense


def eval_data(folder: Path, max_eval_samples: int | None = None) -> tuple[dict, Any, int]:
    """({name: held-out set}, collator, eval batch size) of the run in ``folder``, from its ``report.json``."""
    config = json.loads((folder / "report.json").read_text())["config"]
    data = DataConfig(**config["data"])
    if max_eval_samples is not None:
        data = dataclasses.replace(data, max_eval_samples=max_eval_samples)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder / "final")
    sets, collator = build_eval_sets(config["task"], data, tokenizer)
    return sets, collator, int(config["training"].get("per_device_eval_batch_size", 8))


def held_out_loss(model: torch.nn.Module, sets: dict, collator: Any, batch_size: int) -> dict[str, float]:
    """Per set, the mean next-token loss over every label token (padding and prompt tokens of SFT left out)."""
    model.eval()
    losses = {}
    with torch.no_grad():
        for name, dataset in sets.items():
            total, count = 0.0, 0
            for start in range(0, len(dataset), batch_size):
                batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
                if tokens:
                    total += float(model(**batch).loss) * tokens
                    count += tokens
            losses[name] = total / count if count else float("nan")
    return losses


def load_model(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def lte_rows(final: Path, sets: dict, collator: Any, batch_size: int, thresholds: list[float]) -> list[dict]:
    """The LTE run's weights with every neuron, then its routers at each threshold (stage hard)."""
    model = load_model(final)
    rows = [_row("lte, every neuron", "lte", held_out_loss(model, sets, collator, batch_size), 1.0, 1.0)]
    handle = load_lte(model, final)
    for threshold in thresholds:
        handle.config = dataclasses.replace(handle.config, threshold=threshold)
        with ActiveMeter(model, handle) as meter:
            loss = held_out_loss(model, sets, collator, batch_size)
        summary = meter.summary()
        rows.append(_row("lte", "lte", loss, summary["routed_fraction"], summary["mlp_fraction"], threshold=threshold))
    handle.remove()
    return rows


def baseline_rows(
    model: torch.nn.Module,
    source: str,
    sets: dict,
    collator: Any,
    batch_size: int,
    fractions: list[float],
    lte: dict,
    dense_layers: set[int],
    seed: int = 0,
) -> list[dict]:
    """Top-k (b), top-k experts (b') and random experts (c) of ``model`` at each fraction of the routed MLPs'
    neurons; ``lte`` is the run's LTE config (its expert size and grouping)."""
    expert_size = lte["expert_size"]
    widths = {layer_index(name): mlp_width(block, shape) for name, shape, block in gated_mlps(model)}
    masked = sum(w for layer, w in widths.items() if layer not in dense_layers)
    rows = []
    for fraction in fractions:
        for method, mask in (
            ("top-k", TopKMask(model, fraction, dense_layers)),
            ("top-k experts", TopKExperts(model, fraction, expert_size, lte["kmeans_iterations"], lte["seed"], dense_layers)),
            ("random", RandomExperts(model, fraction, expert_size, seed, dense_layers)),
        ):
            with mask:
                loss = held_out_loss(model, sets, collator, batch_size)
            kept = mask.kept_fraction()
            overall = (kept * masked + sum(widths.values()) - masked) / sum(widths.values())
            rows.append(_row(method, source, loss, kept, overall, target_fraction=fraction))
    return rows


def _row(method: str, model: str, loss: dict, fraction: float | None, mlp_fraction: float | None, **extra) -> dict:
    return {
        "method": method,
        "model": model,
        **extra,
        "fraction": fraction,
        "mlp_fraction": mlp_fraction,
        "held_out_loss": loss,
    }


def table(rows: list[dict]) -> str:
    """Markdown: one row per measurement, losses per held-out set and against the reference (dense, else LTE's
    weights with every neuron) on the first set."""
    names = list(rows[0]["held_out_loss"])
    reference = next((r for r in rows if r["method"] == "dense"), rows[0])
    first = names[0]
    head = ["method", "model", "threshold or target", "routed neurons computed", "MLP neurons computed"]
    head += [f"held-out loss: {n}" for n in names] + [f"vs {reference['method']}: {first}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = f"{r['threshold']:g}" if "threshold" in r else _percent(r.get("target_fraction"))
        cells = [r["method"], r["model"], target if r["method"] in ("lte", "top-k", "top-k experts", "random") else ""]
        cells += [_percent(r["fraction"]), _percent(r["mlp_fraction"])]
        cells += [f"{r['held_out_loss'][n]:.4f}" for n in names]
        cells.append(f"{100 * (r['held_out_loss'][first] / reference['held_out_loss'][first] - 1):+.2f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def plot(rows: list[dict], path: Path) -> None:
    """Held-out loss on the first set against the fraction of MLP neurons computed, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(rows[0]["held_out_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, style in (("lte", "o-"), ("top-k", "s--"), ("top-k experts", "d-."), ("random", "^:")):
        points = sorted(
            (r["mlp_fraction"], r["held_out_loss"][first]) for r in rows if r["method"] == method and r["mlp_fraction"]
        )
        if points:
            ax.plot(*zip(*points), style, label=method)
    for method, color in (("dense", "black"), ("lte, every neuron", "gray")):
        for r in rows:
            if r["method"] == method:
                ax.axhline(r["held_out_loss"][first], color=color, linestyle="--", linewidth=1, label=method)
    ax.set_xlabel("fraction of MLP neurons computed per token")
    ax.set_ylabel(f"held-out loss: {first}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the LTE run folder, or a --compare-dense folder holding lte/ and dense/")
    p.add_argument("--dense", type=Path, help="the dense run folder (default: the --compare-dense folder's dense/)")
    p.add_argument("--thresholds", type=float, nargs="+", help="router thresholds (default: 0.1 ... 0.9 and the run's own)")
    p.add_argument("--fractions", type=float, nargs="*", default=[], help="more fractions for top-k and random, in (0, 1]")
    p.add_argument("--max-eval-samples", type=int, help="cap on blocks or records per held-out set (default: the run's)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's per_device_eval_batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random experts")
    p.add_argument("--json", type=Path, help="write the rows here (a JSON list)")
    p.add_argument("--markdown", type=Path, help="write the table here")
    p.add_argument("--plot", type=Path, help="write the curve here (PNG)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    lte_folder, dense_folder = run_folders(args.run, args.dense)
    final = lte_folder / "final"
    if not (final / CONFIG_NAME).is_file():
        raise SystemExit(f"{final / CONFIG_NAME} not found: {lte_folder} is not the folder of a finished LTE run")
    sets, collator, batch_size = eval_data(lte_folder, args.max_eval_samples)
    batch_size = args.batch_size or batch_size
    saved = json.loads((final / CONFIG_NAME).read_text())
    thresholds = sorted(set(args.thresholds or [*DEFAULT_THRESHOLDS, saved["config"]["threshold"]]))
    rows = []
    if dense_folder is not None:
        base, source = load_model(dense_folder / "final"), "dense"
        rows.append(_row("dense", source, held_out_loss(base, sets, collator, batch_size), 1.0, 1.0))
    rows += lte_rows(final, sets, collator, batch_size, thresholds)
    if dense_folder is None:
        base, source = load_model(final), "lte weights"
    routed = {int(b["layer"]) for b in saved["blocks"]}
    dense_layers = {layer_index(name) for name, _, _ in gated_mlps(base)} - routed
    reached = [r["fraction"] for r in rows if r["method"] == "lte" and r["fraction"]]
    fractions = sorted({round(f, 4) for f in [*reached, *args.fractions] if 0 < f <= 1})
    rows += baseline_rows(
        base, source, sets, collator, batch_size, fractions, LTEConfig(**saved["config"]).to_dict(), dense_layers, args.seed
    )
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
