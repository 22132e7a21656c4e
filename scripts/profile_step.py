"""Where SAT's training step spends time beyond the pruned-dense bound, op by op.

``scripts/benchmark.py`` says how far SAT's step is from the bound; this says what the gap is made
of. It builds the same three models (dense, SAT, the dense model at the kept size) with the same
arguments, warms them up, then profiles ``--profile-steps`` training steps of each (forward,
backward, fused AdamW), one model after another within each round, and prints each op's self time per
step for the three, sorted by what SAT spends beyond the pruned model. Ops only SAT runs (gathers,
scatters, the draw, the autograd functions' Python) and ops SAT runs larger (zero-filled full-size
weight gradients, AdamW over every parameter) come first. Under ``--omit-in backward`` SAT's forward
is dense's: an op of the forward compares with the dense column, one of the backward with the pruned one.
With ``--sat sparse_tokens=context`` the pruned column is the token split's bound (``benchmark.build_split``).

Self times are host times: on a GPU they show launch and Python overhead; the device's own time
per op is the last three columns there (zero on the CPU). The profiler's own overhead inflates
small ops, so totals exceed the timed steps of ``benchmark.py``; compare ops with each other.

    python scripts/profile_step.py --shape smollm2 --batch 2 --rates 0.5 --targets both --omit-in backward
    python scripts/profile_step.py --shape realistic --rates 0.5 --targets mlp --profile-steps 5 --top 40
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark  # noqa: E402

from sat_trainer.app.cpu_memory import keep_freed_memory  # noqa: E402

MODELS = ("dense", "sat", "pruned")


def parser():
    p = benchmark.parser()
    p.description = __doc__
    p.add_argument("--profile-steps", dest="profile_steps", type=int, default=3, help="profiled steps per model (after --warmup)")
    p.add_argument("--top", type=int, default=25, help="ops printed, largest SAT-over-pruned difference first")
    return p


def op_times(args, targets: str, rate: float) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{model: {op: (host ms per step, device ms per step, calls per step)}}`` over the profiled steps."""
    _, steps = benchmark.training_steps(args, targets, rate)
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    sums: dict[str, dict[str, list[float]]] = {name: defaultdict(lambda: [0.0, 0.0, 0.0]) for name in MODELS}
    for _ in range(args.profile_steps):
        for name, step in steps.items():
            with profile(activities=activities) as prof:
                step()
            for event in prof.key_averages():
                acc = sums[name][event.key]
                acc[0] += event.self_cpu_time_total
                acc[1] += event.self_device_time_total
                acc[2] += event.count
    n = args.profile_steps
    return {
        name: {op: (host / n / 1e3, device / n / 1e3, count / n) for op, (host, device, count) in ops.items()}
        for name, ops in sums.items()
    }


def table(times: dict[str, dict[str, tuple[float, float, float]]], top: int) -> str:
    """Markdown: per-step totals, then the ``top`` ops by SAT's host time over the pruned model's."""
    zero = (0.0, 0.0, 0.0)
    ops = set().union(*(times[name] for name in MODELS))
    ordered = sorted(ops, key=lambda op: times["pruned"].get(op, zero)[0] - times["sat"].get(op, zero)[0])
    lines = [
        "| op | dense ms | SAT ms | pruned ms | SAT - pruned ms | SAT calls | pruned calls | dense device ms | SAT device ms | pruned device ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = {name: (sum(v[0] for v in times[name].values()), sum(v[1] for v in times[name].values())) for name in MODELS}
    lines.append(
        f"| **all ops** | {total['dense'][0]:.1f} | {total['sat'][0]:.1f} | {total['pruned'][0]:.1f} | "
        f"{total['sat'][0] - total['pruned'][0]:+.1f} | | | {total['dense'][1]:.1f} | {total['sat'][1]:.1f} | {total['pruned'][1]:.1f} |"
    )
    for op in ordered[:top]:
        d, s, p = (times[name].get(op, zero) for name in MODELS)
        lines.append(
            f"| {op} | {d[0]:.1f} | {s[0]:.1f} | {p[0]:.1f} | {s[0] - p[0]:+.1f} | {s[2]:.0f} | {p[2]:.0f} | {d[1]:.1f} | {s[1]:.1f} | {p[1]:.1f} |"
        )
    return "\n".join(lines)


def parse(argv: list[str] | None = None):
    """``benchmark.py``'s arguments, less those that time no pruned model or do other work (refused)."""
    p = parser()
    args = p.parse_args(argv)
    unused = {
        "--table": args.table,
        "--memory": args.memory,
        "--ladder-steps": args.ladder_steps,
        "--json": args.json,
        "--plot": args.plot,
    }
    for flag, given in unused.items():
        if given:
            p.error(f"{flag} is benchmark.py's; this script profiles one comparison against the pruned model")
    if not benchmark.has_bound(args, benchmark.sat_config(args, args.targets[0], args.rates[0])):
        p.error(
            "no pruned model matches this comparison (--no-bound, --omit-in weight_gradient, --dense-layers, "
            "or --sat sparse_tokens=context with --kernels liger)"
        )
    if args.profile_steps < 1:
        p.error("--profile-steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    keep_freed_memory()
    benchmark.apply_kernels(args)
    for targets in args.targets:
        for rate in args.rates:
            print(
                f"# {benchmark.describe(args)}, targets {targets}, rate {rate}: self time per step over {args.profile_steps} profiled steps"
            )
            print(table(op_times(args, targets, rate), args.top), flush=True)


if __name__ == "__main__":
    main()
