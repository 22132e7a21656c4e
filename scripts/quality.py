"""Quality benchmark: dense vs SAT variants from the embedded base, equal steps and data order.

Each variant is one `sat-train` run of a scenario config (default: the CPT demo, whose held-out
sets measure the new domain and forgetting of the base domain) with ``--set``-style overrides.
All variants share the seed, so they see the same batches in the same order. Results are
appended to a JSON-lines file and printed as a markdown table with, per variant: final held-out
losses and their ratio to dense, time inside training steps, and the time SAT needed to first
reach dense's final held-out loss on the first eval set, as a fraction of dense's time.

With ``--equal-time`` (the CPT protocol: time to a target quality, as MLPerf Training scores
training systems) every SAT variant is also run a second time, as ``<variant>@equal-time``, with
the number of steps that fits in dense's train-step time, its schedule spread over those steps:
at the ``--step-times`` medians when given, else at the variant's own measured time per step
(from its equal-steps run of the same seed, which a busy machine makes noisy).

With ``--step-times BENCH.jsonl`` (rows of ``scripts/benchmark.py --json`` for the same shape) the
curves are re-timed with step times measured on a quiet machine, interleaved: each step costs the
benchmark's median at its scheduled rate (linear between the measured rates, dense's at rate 0),
so the time columns do not depend on what else the machine ran during training.

With ``--timing-rounds N`` each SAT variant's run is followed by ``sat-train --compare-dense``'s interleaved timing
(dense and each rate or EST stage of its schedule in turn, in one process, ``N`` rounds); its step times are kept in
the row, size its equal-time run, and, when every SAT row has them, the table's and plot's times are re-timed in
*dense steps*: a step of dense counts 1, a step of a variant its measured time over dense's (a run's own clock,
shared with other runs, drops out). Runs made side by side then compare on one scale.

With ``--report`` nothing is trained: the table (and a PNG of held-out loss against training
time) is built from the rows already in the JSON-lines file for ``--config``, the latest row per
variant and seed.

Examples:
    python scripts/quality.py --variants dense default                       # the headline pair
    python scripts/quality.py --variants dense metric=uniform metric=magnitude metric=wanda metric=maxip
    python scripts/quality.py --config configs/demo_sft.yaml --variants dense default
    python scripts/quality.py --variants dense default --seeds 0 1 2
    python scripts/quality.py --variants training.max_steps=160               # SAT given more steps
    python scripts/quality.py --variants dense dense,training.learning_rate=6e-5   # dense's learning-rate frontier
    python scripts/quality.py --config configs/smollm2_cpt.yaml --variants dense omit_in=backward --equal-time
    python scripts/quality.py --report --plot docs/journal/bench/quality_cpt.png
    python scripts/quality.py --config configs/smollm2_cpt.yaml --report --min-steps 200 --json A.jsonl B.jsonl --frontier F.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
from pathlib import Path

from sat_trainer import SATConfig
from sat_trainer.app.cpu_memory import keep_freed_memory
from sat_trainer.app.report import equal_time_steps, time_to_reach
from sat_trainer.app.run import run, time_steps
from sat_trainer.app.run_config import load_run_config
from sat_trainer.app.step_timing import StepTimes
from sat_trainer.errors import SATError


def variant_overrides(variant: str) -> tuple[bool, list[str]]:
    """``dense`` / ``default`` / ``k=v[,k=v...]`` / ``dense,k=v[,...]`` -> (dense?, overrides). A bare
    key is one of the sat: block (``targets=[mlp,attention]`` works); a dotted one
    (``training.max_steps=160``) is passed as is, with SAT on. ``dense,training.learning_rate=6e-5``
    is dense with dotted overrides only (a dense learning-rate sweep: SAT's quality is judged against
    dense's whole frontier, not one dense run); it is compared to ``dense`` like any variant."""
    if variant == "dense":
        return True, []
    if variant == "default":
        return False, []
    items = re.split(r",(?![^\[]*\])", variant)  # commas inside [...] belong to a list value
    if items[0] == "dense":
        if not all("." in item.split("=")[0] and "=" in item for item in items[1:]):
            raise SystemExit(
                f"variant {variant!r}: after 'dense,' only dotted overrides (training.learning_rate=6e-5), no sat settings"
            )
        return True, items[1:]
    return False, [item if "." in item.split("=")[0] else f"sat.{item}" for item in items]


def task_of(config: str) -> str:
    """The scenario's task, as its file name says: ``pretrain`` (from scratch), ``sft``, else ``cpt``."""
    stem = Path(config).stem
    return "pretrain" if stem.startswith("pretrain") else "sft" if "sft" in stem else "cpt"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo_cpt.yaml")
    p.add_argument("--variants", nargs="+", default=["dense", "default"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", action="append", default=[], help="override for every variant, e.g. training.max_steps=60")
    p.add_argument("--out", default="runs/quality")
    p.add_argument(
        "--json",
        nargs="+",
        default=["docs/journal/bench/quality.jsonl"],
        help="JSON-lines file(s): training appends to the first, --report reads them all",
    )
    p.add_argument(
        "--equal-time", action="store_true", help="also run each SAT variant for the steps that fit in dense's train-step time"
    )
    p.add_argument("--report", action="store_true", help="train nothing: tabulate the rows already in --json")
    p.add_argument(
        "--min-steps", type=int, default=0, help="--report: only rows of at least this many steps (one protocol among several)"
    )
    p.add_argument("--step-times", help="re-time every curve with the step times of these benchmark.py JSON rows")
    p.add_argument(
        "--timing-rounds",
        type=int,
        default=0,
        help="after each SAT variant's run (with --report: each SAT row without them), time its steps against "
        "dense's interleaved, this many rounds (0: not)",
    )
    p.add_argument("--plot", help="also write a PNG of held-out loss (first eval set) against training time")
    p.add_argument(
        "--frontier",
        help="also write a PNG of the final held-out losses, first eval set against the second "
        "(new domain against forgetting), with dense's runs (e.g. a learning-rate sweep) joined as its frontier",
    )
    args = p.parse_args(argv)
    keep_freed_memory()  # no page faults per step on CPU (sat_trainer.app.cpu_memory): steadier timings
    unit = "s"
    results = saved_results(args.json, args.config, args.min_steps) if args.report else train_variants(args)
    if args.report and args.timing_rounds > 0:
        results = {v: [with_step_times(args, r) for r in rows] for v, rows in results.items()}
    if args.step_times:
        times = step_times(args.step_times)
        results = {v: [retime(r, times) for r in rows] for v, rows in results.items()}
    elif all("step_times" in r for rows in results.values() for r in rows if r["sat"] is not None):
        results = {v: [in_dense_steps(r) for r in rows] for v, rows in results.items()}
        unit = "dense steps"
        print("times in dense steps, at each variant's interleaved step times (--timing-rounds)")
    print(table(results))
    if args.plot:
        plot(results, args.plot, unit)
    if args.frontier:
        frontier(results, args.frontier)


def train_variants(args: argparse.Namespace) -> dict[str, list[dict]]:
    """Run every variant for every seed, appending each result row to ``args.json`` as it lands."""
    task = task_of(args.config)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        rows = {}
        for variant in args.variants:
            rows[variant] = train_one(args, task, seed, variant, [])
            results.setdefault(variant, []).append(rows[variant])
        if args.equal_time and "dense" in rows:
            for variant, row in rows.items():
                if row["sat"] is not None:
                    steps = equal_time_steps_of(args, rows["dense"], row)
                    label = f"{variant}@equal-time"
                    results.setdefault(label, []).append(
                        train_one(args, task, seed, variant, [f"training.max_steps={steps}"], label, row.get("step_times"))
                    )
    return results


def equal_time_steps_of(args: argparse.Namespace, dense: dict, row: dict) -> int:
    """The SAT steps that fit in dense's train-step time: at the ``--step-times`` medians when given
    (robust to what else the machine ran), else at the variant's own time per step."""
    sat = SATConfig.from_dict(row["sat"])
    if args.step_times:
        return step_times(args.step_times)[sat.omit_in].equal_time_steps(sat, dense["steps"])
    if "step_times" in row:
        return StepTimes.from_dict(row["step_times"]).equal_time_steps(sat, dense["steps"])
    return equal_time_steps(dense, row)


def train_one(
    args: argparse.Namespace,
    task: str,
    seed: int,
    variant: str,
    extra: list[str],
    label: str | None = None,
    times: dict | None = None,
) -> dict:
    """One `sat-train` run of ``variant``; its row is appended to ``args.json`` as it lands. A SAT run's row keeps
    ``times`` (its variant's step times, for an equal-time run) or, with ``--timing-rounds``, its own."""
    label = label or variant
    dense, overrides = variant_overrides(variant)
    out = Path(args.out) / Path(args.config).stem / f"seed{seed}" / folder_name(label)
    cfg = load_run_config(
        task, args.config, [*args.set, *overrides, *extra, f"training.seed={seed}", f"training.output_dir={out}"]
    )
    report = run(cfg, dense=dense)
    row = {
        "config": args.config,
        "variant": label,
        "seed": seed,
        "train_time_s": report["train_time_s"],
        "held_out_loss": report["held_out_loss"],
        "evals": report["history"]["held_out"],
        "sat": report["config"]["sat"] if not dense else None,
        "steps": report["steps"],
        "set": args.set,
    }
    if not dense and (times is not None or args.timing_rounds > 0):
        row["step_times"] = times or time_steps(cfg, report["steps"], rounds=args.timing_rounds).to_dict()
    Path(args.json[0]).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json[0], "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def folder_name(label: str) -> str:
    """A run folder's name for a variant label: ``=`` as ``-``, any other character but letters, digits, ``.``,
    ``-`` and ``_`` as ``_`` (a label may hold YAML, e.g. ``est_stages=[{fraction: 0.4}]``); a long one is cut
    and ends with a hash of the whole label, so two labels never share a folder."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("=", "-")).strip("_")
    if len(name) <= 80:
        return name
    return f"{name[:64]}_{hashlib.sha256(label.encode()).hexdigest()[:12]}"


def step_times(path: str) -> dict[str, StepTimes]:
    """{omit_in: its step times} from benchmark.py rows: dense's median, and SAT's median at each
    measured rate (at rate 0, dense's)."""
    by_mode: dict[str, dict[float, list[float]]] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        if "rate" not in row:
            continue
        points = by_mode.setdefault(row.get("omit_in", "forward_backward"), {})
        points.setdefault(0.0, []).append(row["dense_s"])
        points.setdefault(row["rate"], []).append(row["sat_s"])
    medians = {mode: {rate: statistics.median(ts) for rate, ts in sorted(points.items())} for mode, points in by_mode.items()}
    return {mode: StepTimes(dense_s=points[0.0], sat_s=points) for mode, points in medians.items()}


def retime(row: dict, times: dict[str, StepTimes]) -> dict:
    """``row`` with its evals' and total train time rebuilt from per-step times at each step's scheduled rate."""
    sat = SATConfig.from_dict(row["sat"]) if row["sat"] else None
    mode = sat.omit_in if sat else next(iter(times))
    if mode not in times:
        print(
            f"--step-times: {row['variant']} keeps its own train-step times (no benchmark rows for omit_in {mode})",
            file=sys.stderr,
        )
        return row
    measured = times[mode]

    def elapsed(step: int) -> float:
        return measured.curve_time(sat, row["steps"], step) if sat else step * measured.dense_s

    try:
        evals = [{**e, "train_time_s": elapsed(e["step"])} for e in row["evals"]]
        return {**row, "evals": evals, "train_time_s": elapsed(row["steps"])}
    except SATError as err:
        raise SystemExit(f"--step-times: {row['variant']}: {err}") from None


def with_step_times(args: argparse.Namespace, row: dict) -> dict:
    """``--report --timing-rounds N``: a SAT row trained without step times gets them now (its variant's config,
    timed as after training), appended to ``args.json`` as the latest row of its variant and seed."""
    if row["sat"] is None or "step_times" in row:
        return row
    _, overrides = variant_overrides(row["variant"].split("@")[0])
    extra = [f"training.seed={row['seed']}", f"training.output_dir={Path(args.out) / 'timing' / folder_name(row['variant'])}"]
    cfg = load_run_config(task_of(args.config), args.config, [*row["set"], *overrides, *extra])
    timed = {**row, "step_times": time_steps(cfg, row["steps"], rounds=args.timing_rounds).to_dict()}
    with open(args.json[0], "a") as f:
        f.write(json.dumps(timed) + "\n")
    return timed


def in_dense_steps(row: dict) -> dict:
    """``row`` with its evals' and total train time in dense steps: dense's step count, or a SAT run's summed step
    times (its ``step_times``, interleaved with dense's) over dense's step time."""
    if row["sat"] is None:
        elapsed = float
    else:
        sat, times = SATConfig.from_dict(row["sat"]), StepTimes.from_dict(row["step_times"])

        def elapsed(step: int) -> float:
            return times.curve_time(sat, row["steps"], step) / times.dense_s

    evals = [{**e, "train_time_s": elapsed(e["step"])} for e in row["evals"]]
    return {**row, "evals": evals, "train_time_s": elapsed(row["steps"])}


def saved_results(paths: list[str], config: str, min_steps: int = 0) -> dict[str, list[dict]]:
    """Rows of ``config`` (of at least ``min_steps`` steps) in the JSON-lines files, the latest per
    (variant, seed), dense first."""
    latest: dict[tuple[str, int], dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if row["config"] == config and row["steps"] >= min_steps:
                latest[(row["variant"], row["seed"])] = row
    if not latest:
        raise SystemExit(f"no rows for {config} of >= {min_steps} steps in {', '.join(paths)}")
    results: dict[str, list[dict]] = {}
    for (variant, _), row in sorted(latest.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][0] != "default")):
        results.setdefault(variant, []).append(row)
    return results


def table(results: dict[str, list[dict]]) -> str:
    """Mean (and spread over seeds) per variant; against dense, seed by seed, where dense ran that seed."""
    dense = results.get("dense")
    sets = list(next(iter(results.values()))[0]["held_out_loss"])  # config order: the new domain first
    head = (
        "| variant | "
        + " | ".join(f"held-out {s}" for s in sets)
        + " | vs dense | train-step s | speedup | time to dense's loss |"
    )
    lines = [head, "|" + "---|" * (len(sets) + 5)]
    for variant, rows in results.items():
        cells = []
        for s in sets:
            values = [r["held_out_loss"][s] for r in rows]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.4f}{spread}")
        time = statistics.mean(r["train_time_s"] for r in rows)
        pairs = _paired_by_seed(rows, dense or [])
        if pairs:
            first = sets[0]
            ratio = statistics.mean(r["held_out_loss"][first] / d["held_out_loss"][first] for r, d in pairs)
            speedup = statistics.mean(d["train_time_s"] / r["train_time_s"] for r, d in pairs)
            # dense's last curve point: the curve's own held-out blocks (data.curve_eval_samples), not the whole set's loss
            reach = [time_to_reach(r["evals"], first, d["evals"][-1].get(first, d["held_out_loss"][first])) for r, d in pairs]
            reach_cell = (
                "not reached"
                if None in reach
                else f"{statistics.mean(t / d['train_time_s'] for t, (_, d) in zip(reach, pairs)):.2f}x"
            )
            lines.append(
                f"| {variant} | "
                + " | ".join(cells)
                + f" | {100 * (ratio - 1):+.2f}% ({first}) | {time:.1f} | {speedup:.2f}x | {reach_cell} |"
            )
        else:
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | | {time:.1f} | | |")
    return "\n".join(lines)


def _paired_by_seed(rows: list[dict], dense: list[dict]) -> list[tuple[dict, dict]]:
    """Each row with dense's row of the same seed (rows whose seed dense did not run are left out), so a
    variant is compared on the batches and order it saw, whatever order the runs were made in."""
    by_seed = {d["seed"]: d for d in dense}
    return [(r, by_seed[r["seed"]]) for r in rows if r["seed"] in by_seed]


def plot(results: dict[str, list[dict]], path: str, unit: str = "s") -> None:
    """Held-out loss on the first eval set against time inside training steps (in ``unit``), seed 0 of each
    variant; the legend below the axes, a variant label over 90 characters cut in its middle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5 + 0.2 * len(results)))
    first = list(next(iter(results.values()))[0]["held_out_loss"])[0]
    for variant, rows in results.items():
        evals = rows[0]["evals"]
        style = (
            dict(color="black", linewidth=2.5)
            if variant == "dense"
            else dict(linewidth=2.5)
            if variant == "default"
            else dict(alpha=0.7)
        )
        label = variant if len(variant) <= 90 else f"{variant[:40]}…{variant[-49:]}"
        ax.plot([e["train_time_s"] for e in evals], [e[first] for e in evals], marker="o", markersize=3, label=label, **style)
    ax.set_xlabel(f"time inside training steps ({unit})")
    ax.set_ylabel(f"held-out loss: {first}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier(results: dict[str, list[dict]], path: str) -> None:
    """Final held-out loss on the first eval set (x) against the second (y), the lowest seed's rows:
    dense's runs (``dense`` and ``dense,...`` variants, e.g. learning rates) joined in x order as the
    frontier a dense user reaches by tuning, SAT's variants as labelled points. A SAT point is only
    better than dense if it lies below and left of that line, not merely left of the ``dense`` point:
    a larger effective learning rate moves along the line (docs/journal/benchmarks.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = min(r["seed"] for rs in results.values() for r in rs)
    rows = {v: r for v, rs in results.items() for r in rs if r["seed"] == seed}
    points = {v: r["held_out_loss"] for v, r in rows.items()}
    sets = list(next(iter(points.values())))
    if len(sets) < 2:
        raise SystemExit("--frontier needs two held-out sets (the new domain and the old one)")
    first, second = sets[:2]
    fig, ax = plt.subplots(figsize=(8, 7))
    dense = sorted((loss[first], loss[second], v) for v, loss in points.items() if rows[v]["sat"] is None)
    ax.plot([d[0] for d in dense], [d[1] for d in dense], color="black", marker="s", label="dense (joined: its frontier)")
    for x, y, v in dense:
        ax.annotate(
            v.replace("dense,", "").replace("training.", ""), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    markers = "o^vD<>Pp*hX"
    for i, v in enumerate(v for v in points if rows[v]["sat"] is not None):
        ax.scatter(points[v][first], points[v][second], marker=markers[i % len(markers)], s=40, label=v)
    ax.set_xlabel(f"final held-out loss: {first}")
    ax.set_ylabel(f"final held-out loss: {second}")
    ax.set_title(f"seed {seed}: lower left is better", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=1)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
