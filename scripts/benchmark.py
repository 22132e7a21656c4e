"""Speed benchmark: dense vs SAT training steps in one process, interleaved, medians reported.

For each configuration it builds one Llama-shaped model from a config, copies it, patches one
copy with SAT, and alternates timed training steps (forward, backward, fused AdamW step) between
the two, so drift in machine load hits both alike. Beside the measured speedup it prints the
ideal one from the matmul FLOP count (LM head included) and, with ``--memory``, each variant's
peak memory measured in a separate process (CUDA: peak allocated; CPU: peak RSS growth during
the steps).

Examples:
    python scripts/benchmark.py --shape realistic --rates 0.25 0.5 0.75 --targets mlp both attention
    python scripts/benchmark.py --shape realistic --rates 0.5 --lora --memory
    python scripts/benchmark.py --shape realistic --ladder-steps 40
    python scripts/benchmark.py --shape 1b --device cuda --dtype bf16 --rates 0.25 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import transformers

from sat_trainer import SATConfig, apply_sat
from sat_trainer.schedule import omission_rate_at

SHAPES = {
    # the embedded demo base (sat-train pretrain-base)
    "demo": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192),
    # CPU-sized, realistic proportions: per-layer matmuls dominate as at 7B
    "realistic": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, vocab_size=8192),
    # GPU: TinyLlama-1.1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
TARGETS = {"mlp": ["mlp"], "attention": ["attention"], "both": ["mlp", "attention"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_TARGETS = next(name for name, blocks in TARGETS.items() if blocks == SATConfig().targets)


@dataclass
class Row:
    shape: str
    targets: str
    lora: bool
    rate: float
    dense_s: float
    sat_s: float
    dense_range: tuple[float, float]
    sat_range: tuple[float, float]
    speedup: float
    ideal: float
    of_ideal: float


def build(args) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(**SHAPES[args.shape], max_position_embeddings=max(args.seq, 64))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=DTYPES[args.dtype])
    if args.lora:
        import peft

        targets = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    return model.to(args.device).train()


def sat_config(args, targets: str, rate: float) -> SATConfig:
    """The SAT settings every measurement of one configuration uses: timing, ladder and memory alike."""
    return SATConfig(omission_rate=rate, targets=TARGETS[targets], metric=args.metric, selection=args.selection)


def make_step(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=args.device)

    def step() -> float:
        sync(args.device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - start

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def compare(args, targets: str, rate: float) -> Row:
    dense = build(args)
    sat = copy.deepcopy(dense)
    handle = apply_sat(sat, sat_config(args, targets, rate))
    handle.set_rate(rate)
    dense_step, sat_step = make_step(dense, args), make_step(sat, args)
    times = {"dense": [], "sat": []}
    for i in range(args.warmup + args.steps):
        for name, step in (("dense", dense_step), ("sat", sat_step)):
            if name == "sat":
                handle.new_step()
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)
    d, s = statistics.median(times["dense"]), statistics.median(times["sat"])
    ideal = 1.0 / handle.kept_flops_fraction()
    return Row(args.shape, targets, args.lora, rate, d, s, (min(times["dense"]), max(times["dense"])),
               (min(times["sat"]), max(times["sat"])), d / s, ideal, (d / s) / ideal)


def ladder(args, targets: str) -> dict:
    """A whole ladder run against the same number of dense steps, interleaved step by step."""
    cfg = sat_config(args, targets, max(args.rates))
    dense = build(args)
    sat = copy.deepcopy(dense)
    handle = apply_sat(sat, cfg)
    dense_step, sat_step = make_step(dense, args), make_step(sat, args)
    for _ in range(args.warmup):
        dense_step()
        handle.set_rate(cfg.omission_rate)
        handle.new_step()
        sat_step()
    total = {"dense": 0.0, "sat": 0.0}
    flops = []
    for s in range(args.ladder_steps):
        total["dense"] += dense_step()
        handle.set_rate(omission_rate_at(cfg, s, args.ladder_steps))
        handle.new_step()
        total["sat"] += sat_step()
        flops.append(handle.kept_flops_fraction())
    return {"shape": args.shape, "targets": targets, "lora": args.lora, "steps": args.ladder_steps, "peak_rate": cfg.omission_rate,
            "dense_s": total["dense"], "sat_s": total["sat"], "speedup": total["dense"] / total["sat"],
            "ideal": len(flops) / sum(flops)}


def peak_memory(args, targets: str, rate: float | None) -> float:
    """Peak memory (MiB) of a few training steps of one variant, in a fresh process."""
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps({"targets": targets, "rate": rate}), *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(out)


def memory_child(args, spec: dict) -> None:
    """Peak over 3 steps: CUDA peak allocated, or on CPU the peak RSS (sampled every 2 ms) above
    the RSS before the first step (weights are resident by then; grads and Adam state are not)."""
    model = build(args)
    if spec["rate"] is not None:
        handle = apply_sat(model, sat_config(args, spec["targets"], spec["rate"]))
        handle.set_rate(spec["rate"])
    step = make_step(model, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(3):
        if spec["rate"] is not None:
            handle.new_step()
        step()
    stop.set()
    sampler.join()
    if args.device.startswith("cuda"):
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        print((peak[0] - before) / 2**20)


def _rss() -> int:
    """Resident set size in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def plot(rows: list[dict], args) -> None:
    """Measured (solid) and ideal (dashed) speedup against omission rate, one colour per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, targets in enumerate(dict.fromkeys(r["targets"] for r in rows)):
        mine = sorted((r for r in rows if r["targets"] == targets), key=lambda r: r["rate"])
        rates = [r["rate"] for r in mine]
        ax.plot(rates, [r["speedup"] for r in mine], marker="o", color=f"C{i}", label=f"{targets}: measured")
        ax.plot(rates, [r["ideal"] for r in mine], linestyle="--", color=f"C{i}", label=f"{targets}: ideal (FLOPs)")
    ax.set_xlabel("omission rate")
    ax.set_ylabel("speedup over dense (step time)")
    ax.set_title(f"{args.shape}, batch {args.batch} x {args.seq}, {args.dtype}, {args.device}" + (", LoRA" if args.lora else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="realistic")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5])
    p.add_argument("--targets", choices=sorted(TARGETS), nargs="+", default=[DEFAULT_TARGETS], help=f"blocks that omit neurons (default {DEFAULT_TARGETS}, as SATConfig)")
    p.add_argument("--metric", default=SATConfig.metric)
    p.add_argument("--selection", default=SATConfig.selection)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--ladder-steps", type=int, default=0, help="also time a whole ladder run of this many steps")
    p.add_argument("--memory", action="store_true", help="also measure peak memory per variant (separate processes)")
    p.add_argument("--json", help="append result rows to this JSON-lines file")
    p.add_argument("--plot", help="write a PNG of measured and ideal speedup against omission rate, per target")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args, json.loads(args.memory_child))

    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.dtype}, "
          f"shape {args.shape}, batch {args.batch} x {args.seq}, lora={args.lora}, fused AdamW")
    print("| targets | rate | dense s/step (min-max) | SAT s/step (min-max) | speedup | ideal | of ideal |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for targets in args.targets:
        for rate in args.rates:
            row = compare(args, targets, rate)
            results.append(asdict(row))
            print(f"| {targets} | {rate} | {row.dense_s:.3f} ({row.dense_range[0]:.3f}-{row.dense_range[1]:.3f}) | "
                  f"{row.sat_s:.3f} ({row.sat_range[0]:.3f}-{row.sat_range[1]:.3f}) | {row.speedup:.2f}x | "
                  f"{row.ideal:.2f}x | {row.of_ideal:.2f} |", flush=True)
            if args.memory:
                dense_mb, sat_mb = peak_memory(args, targets, None), peak_memory(args, targets, rate)
                results[-1].update(dense_peak_mib=dense_mb, sat_peak_mib=sat_mb)
                print(f"|   peak memory | | dense {dense_mb:.0f} MiB | SAT {sat_mb:.0f} MiB | | | |", flush=True)
        if args.ladder_steps:
            lad = ladder(args, targets)
            results.append(lad)
            print(f"| {targets} | ladder {lad['steps']} steps | {lad['dense_s']:.1f} s total | {lad['sat_s']:.1f} s total | "
                  f"{lad['speedup']:.2f}x | {lad['ideal']:.2f}x | {lad['speedup'] / lad['ideal']:.2f} |", flush=True)
    if args.plot:
        plot([r for r in results if "rate" in r], args)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "device": args.device, "dtype": args.dtype, "batch": args.batch, "seq": args.seq}) + "\n")


if __name__ == "__main__":
    main()
