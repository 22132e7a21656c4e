"""Speed benchmark: dense vs SAT vs the pruned-dense bound, training steps in one process, interleaved.

For each configuration it builds one Llama-shaped model from a config, copies it, patches one
copy with SAT, and builds a third, *pruned* dense model whose MLP (and, with attention targets,
KV groups) has the kept size built in: what perfect slicing would give (with ``--omit-in
backward``, where SAT's forward runs dense, the bound is the dense model's median forward time
plus the pruned model's median backward-and-optimizer time, both from the same loop). With the SFT token
split (``--sat sparse_tokens=context``), where SAT's MLP runs the loss rows dense and the context rows at
the kept width, the bound is :func:`build_split`'s model instead: the dense model whose MLP blocks send the
same dense rows through the whole projections and the sparse rows through their first ``k`` channels
(views of the same weights, so the optimizer steps over the full-size parameters, as SAT's does), with
the same ``omit_in`` combination. It alternates timed
training steps (forward, backward, fused AdamW step) between the three, so drift in machine
load hits all alike (the order rotating each round), and reports medians, SAT's speedup, the bound's speedup, SAT's fraction of
the bound and the ideal speedup from the matmul FLOP count (LM head included). With
``--memory`` each variant's peak memory is measured in a separate process (CUDA: peak
allocated; CPU: peak RSS growth during the steps).

Examples:
    python scripts/benchmark.py --shape realistic --rates 0.25 0.5 0.75 --targets mlp both attention
    python scripts/benchmark.py --shape realistic --rates 0.5 --lora --memory
    python scripts/benchmark.py --shape smollm2 --batch 4 --rates 0.5 0.75 --omit-in backward
    python scripts/benchmark.py --shape realistic --ladder-steps 40
    python scripts/benchmark.py --shape 1b --device cuda --precision bf16 --kernels liger --compile
    python scripts/benchmark.py --table cpu --rates 0.25 0.5 --targets mlp both --warmup 1 --steps 5 --json docs/journal/bench/issue15_cpu.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import transformers

from sat_trainer import SATConfig, apply_sat
from sat_trainer.app.cpu_memory import keep_freed_memory
from sat_trainer.app.shapes import SHAPES as PRETRAIN_SHAPES
from sat_trainer.app.step_timing import interleaved
from sat_trainer.patch.forward_context import loss_token_split
from sat_trainer.schedule import kept_count, omission_rate_at
from sat_trainer.yaml_io import parse_value

SHAPES = {
    # the embedded demo base (sat-train pretrain-base)
    "demo": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192
    ),
    # CPU-sized, realistic proportions: per-layer matmuls dominate as at 7B
    "realistic": dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    # SmolLM2-135M's shape (random weights: speed does not depend on them)
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # GPU: TinyLlama-1.1B's shape, and 6 of its layers (to bound compile time)
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    "1b6l": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    # GPU: 4 layers of Llama-3-8B (GQA) and of Llama-2-7B (MHA)
    "8b4l": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
    "7b4l": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    # `sat-train pretrain`'s llama-10m (configs/pretrain_llama_python.yaml, EST's scenario), at its 8k vocabulary
    "llama-10m": {**PRETRAIN_SHAPES["llama-10m"][1], "vocab_size": 8192},
    # checks the scripts only
    "tiny": dict(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
    ),
}
TARGETS = {"mlp": ["mlp"], "attention": ["attention"], "both": ["mlp", "attention"]}
# --table cpu: every (shape, batch x seq) configuration of the CPU table, each at --rates x --targets
TABLES = {"cpu": [(shape, batch, 256) for shape in ("smollm2", "realistic") for batch in (2, 4, 16)]}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "autocast": torch.float32}  # autocast: fp32 weights, bf16 compute
DEFAULT_TARGETS = next(name for name, blocks in TARGETS.items() if blocks == SATConfig().targets)


@dataclass
class Row:
    shape: str
    targets: str
    lora: bool
    rate: float
    omit_in: str
    dense_s: float
    sat_s: float
    dense_range: tuple[float, float]
    sat_range: tuple[float, float]
    speedup: float
    ideal: float
    of_ideal: float
    pruned_s: float | None = None
    bound: float | None = None  # the pruned-dense model's speedup
    of_bound: float | None = None  # SAT's speedup over the bound's
    extra: dict = field(default_factory=dict)


def apply_kernels(args) -> None:
    """Liger-Kernel's Llama patch (class level, so it must run before the models are built)."""
    if args.kernels == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)


def build(args, after: dict | None = None, **overrides) -> torch.nn.Module:
    """The benchmark model, created on the device; ``overrides`` change the config (pruned sizes), ``after``
    sets config fields once it is built."""
    cfg = transformers.LlamaConfig(**{**SHAPES[args.shape], **overrides}, max_position_embeddings=max(args.seq, 64))
    for key, value in (after or {}).items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=PRECISIONS[args.precision])
    if args.lora:
        import peft

        targets = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    if args.gradient_checkpointing:  # as Trainer's gradient_checkpointing=True with use_reentrant False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(args.device).train()


def build_pruned(args, targets: str, rate: float) -> torch.nn.Module:
    """The dense model at SAT's kept size: intermediate k of n channels, and for attention k of
    the KV groups (each with its query heads), as ``kept_count`` gives SAT."""
    shape = SHAPES[args.shape]
    over: dict = {}
    if "mlp" in TARGETS[targets]:
        over["intermediate_size"] = kept_count(shape["intermediate_size"], rate)
    if "attention" in TARGETS[targets]:
        kv = kept_count(shape["num_key_value_heads"], rate)
        over["head_dim"] = shape["hidden_size"] // shape["num_attention_heads"]
        # set after the config is built: its validator refuses a hidden size that is not a multiple of the
        # head count (1024 and 12 kept heads), though an explicit head_dim makes the model well defined
        heads = {
            "num_key_value_heads": kv,
            "num_attention_heads": kv * (shape["num_attention_heads"] // shape["num_key_value_heads"]),
        }
        return build(args, after=heads, **over)
    return build(args, **over)


class _SplitLinear(torch.autograd.Function):
    """One weight, two row sets: the dense rows ``x_d`` through all of ``w``, the sparse rows ``x_s`` through
    its kept part, the first ``k`` output rows of ``w`` (``dim`` 0, gate and up) or its first ``k`` input
    columns (``dim`` 1, down). Only matmuls: the kept part is a view (BLAS reads it with ``w``'s leading
    dimension), and in backward its weight gradient is added in place into the slice of the dense rows'
    (no gather, no zero-filled full-size gradient), so the FLOPs are exactly those of the split: a
    perfect implementation of the channel slicing. Under autocast the matmuls run in its dtype."""

    @staticmethod
    def forward(ctx, x_d, x_s, w, k, dim):
        device = x_d.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_d.dtype
        ctx.k, ctx.dim, ctx.dtypes = k, dim, (x_d.dtype, x_s.dtype, w.dtype)
        with torch.autocast(device, enabled=False):
            x_d, x_s, w = x_d.to(dtype), x_s.to(dtype), w.to(dtype)
            ctx.save_for_backward(x_d, x_s, w)
            return x_d @ w.t(), x_s @ _kept(w, k, dim).t()

    @staticmethod
    def backward(ctx, g_d, g_s):
        x_d, x_s, w = ctx.saved_tensors
        g_d, g_s = g_d.to(w.dtype), g_s.to(w.dtype)
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = g_d.t() @ x_d
            _kept(grad_w, ctx.k, ctx.dim).addmm_(g_s.t(), x_s)
            grad_w = grad_w.to(ctx.dtypes[2])
        grad_d = (g_d @ w).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        grad_s = (g_s @ _kept(w, ctx.k, ctx.dim)).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return grad_d, grad_s, grad_w, None, None


def _kept(w: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    return w[:k] if dim == 0 else w[:, :k]


def split_rows(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense rows, sparse rows) of a step's flattened tokens under ``sparse_tokens: context``: SAT's own
    rule (``loss_token_split``: a row is dense if its label or the next token's is not -100) applied to
    :func:`make_step`'s labels, whose pattern depends on the shape only."""
    labels = torch.zeros(args.batch, args.seq, dtype=torch.long)
    labels[:, : round(args.context_fraction * args.seq)] = -100
    return tuple(rows.to(args.device) for rows in loss_token_split(labels, True))


def build_split(args, rate: float) -> torch.nn.Module:
    """The bound of the token split (``sparse_tokens: context``, MLP targets only): the dense model, each MLP
    block running the dense rows of :func:`split_rows` through the whole block and the sparse rows through
    its first ``k`` channels (``k = kept_count``, as SAT keeps), attention dense over every token as SAT's.
    A dense model for the dense rows and a pruned one for the sparse rows, sharing the weights: the
    optimizer steps once over the full-size parameters, as SAT's does (two separate models would also
    split attention, which mixes the two row sets). The rows are found once, from the labels' pattern
    (SAT finds them each forward); each block gathers its input's two row sets and scatters its output's.
    With ``--lora`` the dense rows run PEFT's own LoRA layers and the sparse rows the frozen base's and the
    adapters' kept parts as views (:func:`_lora_kept`)."""
    model = build(args)
    dense_rows, sparse_rows = split_rows(args)
    k = kept_count(SHAPES[args.shape]["intermediate_size"], rate)
    layers = model.base_model.model.model.layers if args.lora else model.model.layers
    for layer in layers:
        mlp = layer.mlp
        assert all(getattr(mlp, name).bias is None for name in ("gate_proj", "up_proj", "down_proj"))
        mlp.forward = functools.partial(_lora_split_forward if args.lora else _split_forward, mlp, dense_rows, sparse_rows, k)
    return model


def _split_forward(mlp, dense_rows, sparse_rows, k, x):
    flat = x.reshape(-1, x.shape[-1])
    x_d, x_s = flat.index_select(0, dense_rows), flat.index_select(0, sparse_rows)
    gate = _SplitLinear.apply(x_d, x_s, mlp.gate_proj.weight, k, 0)
    up = _SplitLinear.apply(x_d, x_s, mlp.up_proj.weight, k, 0)
    h_d, h_s = (mlp.act_fn(g) * u for g, u in zip(gate, up))
    o_d, o_s = _SplitLinear.apply(h_d, h_s, mlp.down_proj.weight, k, 1)
    return _scatter(x, dense_rows, sparse_rows, o_d, o_s)


def _lora_split_forward(mlp, dense_rows, sparse_rows, k, x):
    flat = x.reshape(-1, x.shape[-1])
    x_d, x_s = flat.index_select(0, dense_rows), flat.index_select(0, sparse_rows)
    h_d = mlp.act_fn(mlp.gate_proj(x_d)) * mlp.up_proj(x_d)
    h_s = mlp.act_fn(_lora_kept(mlp.gate_proj, x_s, k, 0)) * _lora_kept(mlp.up_proj, x_s, k, 0)
    return _scatter(x, dense_rows, sparse_rows, mlp.down_proj(h_d), _lora_kept(mlp.down_proj, h_s, k, 1))


def _lora_kept(layer, x, k, dim):
    """A PEFT LoRA linear restricted to its first ``k`` outputs (``dim`` 0) or inputs (``dim`` 1): the frozen
    base weight and the adapter's matching factor as views, so the only extra work is the adapter's."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    base, scale = layer.base_layer.weight, layer.scaling["default"]
    if dim == 0:
        return F.linear(x, base[:k]) + scale * F.linear(F.linear(x, a), b[:k])
    return F.linear(x, base[:, :k]) + scale * F.linear(F.linear(x, a[:, :k]), b)


def _scatter(x, dense_rows, sparse_rows, o_d, o_s):
    out = o_d.new_empty(dense_rows.numel() + sparse_rows.numel(), o_d.shape[1]).index_copy(0, dense_rows, o_d)
    return out.index_copy(0, sparse_rows, o_s).reshape(*x.shape[:-1], out.shape[-1])


def sat_config(args, targets: str, rate: float) -> SATConfig:
    """The SAT settings every measurement of one configuration uses: timing, ladder and memory alike; the
    schedule is the paper's ladder without a dense start (``--ladder-steps`` times it; ``--sat`` changes it)."""
    extra = dict(sat_setting(item) for item in args.sat)
    return SATConfig(
        **{
            "omission_rate": rate,
            "targets": TARGETS[targets],
            "metric": args.metric,
            "selection": args.selection,
            "omit_in": args.omit_in,
            "dense_layers": args.dense_layers,
            "schedule": "ladder",
            "dense_warmup_fraction": 0.0,
            **extra,
        }
    )


def sat_setting(item: str) -> tuple[str, object]:
    """``--sat key=value``: one more SATConfig setting, the value parsed as YAML (SATConfig checks it)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise SystemExit(f"--sat {item!r}: expected key=value, e.g. score_every=1000")
    return key.strip(), parse_value(value, f"--sat {item!r}")


def make_step(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch, args.seq), device=args.device)
    labels = ids.clone()
    labels[:, : round(args.context_fraction * args.seq)] = -100  # SFT: a prompt that carries no loss
    forward = torch.compile(model) if args.compile else model
    device_type = torch.device(args.device).type

    def step() -> tuple[float, float]:
        """(step seconds, of which the forward); the forward's end is synced on a GPU."""
        sync(args.device)
        start = time.perf_counter()
        amp = torch.autocast(device_type, dtype=torch.bfloat16) if args.precision == "autocast" else contextlib.nullcontext()
        with amp:
            loss = forward(input_ids=ids, labels=labels).loss
        sync(args.device)
        forward_s = time.perf_counter() - start
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        return time.perf_counter() - start, forward_s

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def has_bound(args, config: SATConfig) -> bool:
    """Whether a pruned model is timed: none matches a dense input gradient or layers of different widths;
    the token split's (:func:`build_split`) is built for the Hugging Face Llama MLP, bare or with PEFT LoRA (not
    Liger's fused SwiGLU)."""
    split_unbuilt = is_split(config) and args.kernels != "hf"
    return args.bound and args.omit_in != "weight_gradient" and not args.dense_layers and not split_unbuilt


def is_split(config: SATConfig) -> bool:
    """SAT's MLP splits the token rows (``sparse_tokens: context``): the bound is :func:`build_split`'s."""
    return config.sparse_tokens == "context"


def training_steps(args, targets: str, rate: float):
    """``(SAT's handle, {"dense", "sat"[, "pruned"]: step})``: the models one comparison times, each a
    training step returning ``(seconds, of which the forward)``; SAT's makes a new draw first, as in training."""
    dense = build(args)
    sat = copy.deepcopy(dense)
    handle = apply_sat(sat, sat_config(args, targets, rate))
    handle.set_rate(rate)
    steps = {"dense": make_step(dense, args), "sat": make_step(sat, args)}
    if has_bound(args, handle.config):
        bound = build_split(args, rate) if is_split(handle.config) else build_pruned(args, targets, rate)
        steps["pruned"] = make_step(bound, args)
    sat_step = steps["sat"]
    steps["sat"] = lambda: (handle.new_step(), sat_step())[1]
    return handle, steps


def compare(args, targets: str, rate: float) -> Row:
    handle, steps = training_steps(args, targets, rate)
    times = interleaved(steps, args.warmup, args.steps)
    total = {name: [t for t, _ in ts] for name, ts in times.items()}
    d, s = statistics.median(total["dense"]), statistics.median(total["sat"])
    ideal = 1.0 / handle.kept_flops_fraction()
    row = Row(
        args.shape,
        targets,
        args.lora,
        rate,
        args.omit_in,
        d,
        s,
        (min(total["dense"]), max(total["dense"])),
        (min(total["sat"]), max(total["sat"])),
        d / s,
        ideal,
        (d / s) / ideal,
    )
    row.extra = {f"{name}_forward_s": statistics.median(f for _, f in ts) for name, ts in times.items()}
    if "pruned" in steps:
        row.pruned_s = statistics.median(total["pruned"])
        if args.omit_in == "backward":  # a dense forward, then the pruned model's backward and optimizer step
            row.pruned_s = row.extra["dense_forward_s"] + statistics.median(t - f for t, f in times["pruned"])
        row.bound = d / row.pruned_s
        row.of_bound = row.pruned_s / s
    return row


def ladder(args, targets: str) -> dict:
    """A whole ladder run against the same number of dense steps, interleaved step by step.

    Warm-up steps run at the peak rate only, as a real run starts there; each step's time is
    kept, so the cost of the first step at each new kept count shows (``rung_first_excess_s``:
    the first step of each later rung over that rung's median).
    """
    cfg = sat_config(args, targets, max(args.rates))
    dense = build(args)
    sat = copy.deepcopy(dense)
    handle = apply_sat(sat, cfg)
    dense_step, sat_step = (lambda f=make_step(dense, args): f()[0]), (lambda f=make_step(sat, args): f()[0])
    for _ in range(args.warmup):
        dense_step()
        handle.set_rate(cfg.omission_rate)
        handle.new_step()
        sat_step()
    per_step = {"dense": [], "sat": []}
    rates, flops = [], []
    for s in range(args.ladder_steps):
        per_step["dense"].append(dense_step())
        rates.append(omission_rate_at(cfg, s, args.ladder_steps))
        handle.set_rate(rates[-1])
        handle.new_step()
        per_step["sat"].append(sat_step())
        flops.append(handle.kept_flops_fraction())
    starts = [s for s in range(1, len(rates)) if rates[s] != rates[s - 1]]
    ends = starts[1:] + [len(rates)]
    excess = [per_step["sat"][a] - statistics.median(per_step["sat"][a:b]) for a, b in zip(starts, ends)]
    total = {k: sum(v) for k, v in per_step.items()}
    return {
        "shape": args.shape,
        "targets": targets,
        "lora": args.lora,
        "omit_in": args.omit_in,
        "steps": args.ladder_steps,
        "peak_rate": cfg.omission_rate,
        "dense_s": total["dense"],
        "sat_s": total["sat"],
        "speedup": total["dense"] / total["sat"],
        "ideal": len(flops) / sum(flops),
        "rates": rates,
        "per_step": per_step,
        "rung_first_excess_s": excess,
    }


def peak_memory(args, targets: str, rate: float | None) -> float:
    """Peak memory (MiB) of a few training steps of one variant, in a fresh process."""
    spec = {"targets": targets, "rate": rate, "shape": args.shape, "batch": args.batch, "seq": args.seq}  # --table moves these
    cmd = [sys.executable, __file__, "--_memory-child", json.dumps(spec), *sys.argv[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return float(out)


def memory_child(args, spec: dict) -> None:
    """Peak over 3 steps: CUDA peak allocated, or on CPU the peak RSS (sampled every 2 ms) above
    the RSS before the first step (weights are resident by then; grads and Adam state are not)."""
    args.shape, args.batch, args.seq = spec["shape"], spec["batch"], spec["seq"]
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
    ax.set_title(describe(args), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="realistic")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5])
    p.add_argument(
        "--targets",
        choices=sorted(TARGETS),
        nargs="+",
        default=[DEFAULT_TARGETS],
        help=f"blocks that omit neurons (default {DEFAULT_TARGETS}, as SATConfig)",
    )
    p.add_argument("--metric", default=SATConfig.metric)
    p.add_argument("--selection", default=SATConfig.selection)
    p.add_argument(
        "--omit-in",
        dest="omit_in",
        choices=["forward_backward", "backward", "weight_gradient"],
        default="forward_backward",
        help="SATConfig.omit_in (default forward_backward, the paper's SAT and the mode of the documented rows; the package default is backward); backward: the bound is a dense forward plus a pruned backward (weight_gradient: no bound)",
    )
    p.add_argument(
        "--dense-layers",
        dest="dense_layers",
        type=int,
        nargs="*",
        default=[],
        help="SATConfig.dense_layers (no bound is timed then)",
    )
    p.add_argument(
        "--sat",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other SATConfig setting, e.g. "
        "score_every=1000 or activation_scores=training_forward (values parsed as YAML; repeatable)",
    )
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default="fp32",
        help="autocast: fp32 weights, bf16 autocast (Trainer's bf16=True)",
    )
    p.add_argument(
        "--kernels",
        choices=["hf", "liger"],
        default="hf",
        help="liger: Liger-Kernel's Llama patch (rope, rms_norm, swiglu, fused linear cross-entropy)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile every model (dense, SAT, pruned)")
    p.add_argument(
        "--gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_true",
        help="every model (dense, SAT, pruned) recomputes each decoder layer's activations in backward (non-reentrant)",
    )
    p.add_argument(
        "--context-fraction",
        dest="context_fraction",
        type=float,
        default=0.0,
        help="label the first this fraction of each sequence -100, as an SFT prompt (with --sat sparse_tokens=context "
        "those tokens run sparse and the rest dense; the bound is then a dense model for the dense rows and a pruned one "
        "for the sparse rows, sharing the weights)",
    )
    p.add_argument("--no-bound", dest="bound", action="store_false", help="skip the pruned-dense model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--ladder-steps", type=int, default=0, help="also time a whole ladder run of this many steps")
    p.add_argument("--memory", action="store_true", help="also measure peak memory per variant (separate processes)")
    p.add_argument(
        "--table",
        choices=sorted(TABLES),
        help="cpu: SmolLM2-135M's and the realistic shape at 512, 1024 and 4096 "
        "tokens per step (batch 2, 4, 16 x 256), each at --rates x --targets (overrides --shape/--batch/--seq)",
    )
    p.add_argument("--json", help="append result rows to this JSON-lines file (each row as it finishes)")
    p.add_argument("--plot", help="write a PNG of measured and ideal speedup against omission rate, per target")
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    return p


def describe(args) -> str:
    return (
        f"{args.shape}, batch {args.batch} x {args.seq}, omit_in {args.omit_in}, {args.precision}, kernels {args.kernels}"
        f"{', compiled' if args.compile else ''}{', gradient checkpointing' if args.gradient_checkpointing else ''}"
        f"{', LoRA r16' if args.lora else ''}, device {args.device}"
        f"{''.join(', ' + item for item in args.sat)}"
    )


def format_row(row: Row) -> str:
    bound = f"{row.pruned_s:.4f} | {row.bound:.2f}x | {row.of_bound:.2f}" if row.bound else "- | - | -"
    return (
        f"| {row.targets} | {row.rate} | {row.dense_s:.4f} ({row.dense_range[0]:.4f}-{row.dense_range[1]:.4f}) | "
        f"{row.sat_s:.4f} ({row.sat_range[0]:.4f}-{row.sat_range[1]:.4f}) | {row.speedup:.2f}x | {bound} | {row.ideal:.2f}x |"
    )


TABLE_HEAD = (
    "| targets | rate | dense s/step (min-max) | SAT s/step (min-max) | SAT speedup | pruned s/step | bound | of bound | FLOP ideal |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def format_ladder(lad: dict) -> str:
    excess = ", ".join(f"{e:+.3f}" for e in lad["rung_first_excess_s"])
    return (
        f"| {lad['targets']} | ladder {lad['steps']} steps | {lad['dense_s']:.2f} s total | {lad['sat_s']:.2f} s total | "
        f"{lad['speedup']:.2f}x | first step of each later rung over its median: {excess} s | | | {lad['ideal']:.2f}x |"
    )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    keep_freed_memory()  # no page faults per step on CPU (sat_trainer.app.cpu_memory): steadier timings
    apply_kernels(args)
    if args.memory_child:
        return memory_child(args, json.loads(args.memory_child))

    configurations = TABLES[args.table] if args.table else [(args.shape, args.batch, args.seq)]
    results = []
    for args.shape, args.batch, args.seq in configurations:
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {describe(args)}, fused AdamW")
        print(TABLE_HEAD)
        for targets in args.targets:
            for rate in args.rates:
                measured = compare(args, targets, rate)
                print(format_row(measured), flush=True)
                row = asdict(measured)
                if args.memory:
                    dense_mb, sat_mb = peak_memory(args, targets, None), peak_memory(args, targets, rate)
                    row.update(dense_peak_mib=dense_mb, sat_peak_mib=sat_mb)
                    print(f"|   peak memory | | dense {dense_mb:.0f} MiB | SAT {sat_mb:.0f} MiB | | | | | |", flush=True)
                results.append(row)
                write_row(args, row)
            if args.ladder_steps:
                lad = ladder(args, targets)
                results.append(lad)
                write_row(args, lad)
                print(format_ladder(lad), flush=True)
    if args.plot:
        plot([r for r in results if "rate" in r], args)


def write_row(args, row: dict) -> None:
    """Append one result to ``--json`` as soon as it is measured: a long table keeps what it finished."""
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({**row, **context(args)}) + "\n")


def context(args) -> dict:
    """What a JSON row needs besides its numbers to be reproduced."""
    return {
        "shape": args.shape,
        "device": args.device,
        "precision": args.precision,
        "kernels": args.kernels,
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch": args.batch,
        "seq": args.seq,
        "metric": args.metric,
        "selection": args.selection,
        "dense_layers": args.dense_layers,
        "sat": args.sat,
        "context_fraction": args.context_fraction,
    }


if __name__ == "__main__":
    main()
