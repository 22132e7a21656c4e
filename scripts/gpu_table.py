"""The whole GPU speed table in one command (about 6 minutes on one H100): every row is
``scripts/benchmark.py``'s dense / SAT / pruned-dense comparison or its ladder run, at the
shapes and settings of docs/journal/benchmarks.md's GPU section. Rows go to ``OUT/rows.jsonl`` (one JSON
object per row, the settings included; ``--rows`` renames it) and a Markdown log to ``OUT/log.md``.

    python scripts/gpu_table.py --out $OUT                 # on a CUDA machine
    python scripts/gpu_table.py --quick --out /tmp/gpu     # tiny shapes on the CPU: checks the script
    python scripts/gpu_table.py --only 1b-hf,ladder        # a subset, by row-group name

Liger-Kernel patches transformers' Llama classes for the whole process, so its rows run last.
Rows are skipped (and say so) once ``--budget`` seconds are spent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402

# (group name, benchmark arguments, targets); the GPU shapes and token counts of the table
GROUPS = [
    ("1b-hf", "--shape 1b --batch 4 --seq 2048", ["mlp", "both"]),
    ("ladder", "--shape 1b --batch 4 --seq 2048 --ladder-steps 40 --no-bound", ["mlp", "both"]),
    ("8b4l-hf", "--shape 8b4l --batch 2 --seq 4096", ["mlp", "both"]),
    ("7b4l-hf", "--shape 7b4l --batch 2 --seq 4096", ["mlp", "both"]),
    ("1b-autocast", "--shape 1b --batch 4 --seq 2048 --precision autocast", ["mlp", "both"]),
    ("1b-lora", "--shape 1b --batch 4 --seq 2048 --lora", ["mlp", "both"]),
    ("compile", "--shape 1b6l --batch 4 --seq 2048 --compile --warmup 3", ["mlp"]),
    ("8b4l-liger", "--shape 8b4l --batch 2 --seq 4096 --kernels liger", ["mlp", "both"]),
    ("1b-liger", "--shape 1b --batch 4 --seq 2048 --kernels liger", ["mlp"]),
    ("1b-liger-sft", "--shape 1b --batch 16 --seq 512 --kernels liger", ["mlp"]),
]


def group_args(spec: str, quick: bool, steps: int) -> argparse.Namespace:
    """A group's benchmark arguments: bf16 weights unless the group says otherwise; ``quick``
    shrinks the shape and step counts so the whole table runs on a CPU in a minute."""
    args = benchmark.parser().parse_args(spec.split() + ["--steps", str(steps)])
    if "--precision" not in spec:
        args.precision = "fp32" if quick else "bf16"
    args.device = "cpu" if quick else "cuda"
    if quick:
        args.shape, args.batch, args.seq, args.warmup, args.steps = "tiny", 2, 32, 1, 2
        args.ladder_steps = 6 if args.ladder_steps else 0
    return args


def run_group(args: argparse.Namespace, targets: list[str], log, rows: list[dict]) -> None:
    benchmark.apply_kernels(args)
    log(f"\n### {benchmark.describe(args)}\n\n{benchmark.TABLE_HEAD}")
    for t in targets:
        if args.ladder_steps:
            lad = benchmark.ladder(args, t)
            rows.append({**lad, **benchmark.context(args)})
            log(benchmark.format_ladder(lad))
            continue
        row = benchmark.compare(args, t, args.rates[0])
        rows.append({**asdict(row), **benchmark.context(args)})
        log(benchmark.format_row(row))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--rows", default="rows.jsonl", help="file name of the JSON rows under --out (log.md is appended to)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU, Liger rows skipped")
    p.add_argument("--only", default="", help="comma-separated group names")
    p.add_argument("--budget", type=float, default=330, help="seconds; later groups are skipped")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--targets", default="", help="comma-separated subset of each group's targets (mlp, both)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if a.quick else "cuda"

    def log(line: str) -> None:
        print(line, flush=True)
        with open(out / "log.md", "a") as f:
            f.write(line + "\n")

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    import transformers

    import sat_trainer

    log(
        f"# GPU table: {name}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"sat_trainer from {Path(sat_trainer.__file__).parent}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    rows: list[dict] = []
    start = time.time()
    for group, spec, targets in GROUPS:
        if a.only and group not in a.only.split(","):
            continue
        liger = "--kernels liger" in spec
        if a.quick and liger:
            log(f"\n### {group}: skipped (Liger-Kernel needs a GPU)")
            continue
        if time.time() - start > a.budget:
            log(f"\n### {group}: skipped (budget of {a.budget:.0f} s spent)")
            continue
        t0 = time.time()
        try:
            chosen = [t for t in targets if not a.targets or t in a.targets.split(",")]
            run_group(group_args(spec, a.quick, a.steps), chosen, log, rows)
        except Exception as err:  # one failing group must not lose the others' rows
            log(f"FAILED {group}: {type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}")
        log(f"({group}: {time.time() - t0:.0f} s; elapsed {time.time() - start:.0f} s)")
        with open(out / a.rows, "w") as f:
            for r in rows:
                f.write(json.dumps({**r, "card": name}) + "\n")


if __name__ == "__main__":
    main()
