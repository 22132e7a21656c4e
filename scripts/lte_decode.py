"""LTE decode speed: batch-1 greedy ``model.generate`` (KV cache) of dense, LTE's sparse path, and the bound, interleaved.

For each active fraction (``--active``) it builds, from one random-weight Llama of ``--shape`` (SmolLM2-135M's by
default), three models and times them in one process, in turn:

* ``dense``: the model itself;
* ``lte``: a copy with LTE installed in stage hard and eval (the sparse inference path of
  :mod:`sat_trainer.lte.inference`); its routers keep their random initial weights and the threshold is set to the
  ``1 - active`` quantile of their scores on the prompt, so each token selects its own experts and about that
  fraction runs on average (the fraction reached while decoding is measured and reported);
* ``bound``: a dense model whose MLPs have the intermediate size LTE reached (measured fraction times the width):
  what a perfect sparse kernel with no routing cost could give.

With ``--lte FOLDER`` the dense model is the one saved there (``from_pretrained``) and LTE is its own
``lte.safetensors`` (:func:`~sat_trainer.lte.model.load_lte`, its own threshold); ``--active`` is then unused.
The models are Llama-style (the bound narrows ``intermediate_size``; widths are read off ``up_proj``).

Each timed call is one greedy ``generate`` of ``--new-tokens`` tokens from a ``--prompt``-token prompt at batch 1,
fp32, under ``torch.inference_mode``; a logits processor stamps the time of every generated token, so *prefill* is
the time to the first token and *decode* the tokens after it over their time. The router's cost is inside LTE's
time. Rounds rotate the order (:func:`sat_trainer.app.step_timing.interleaved`), after ``--warmup`` untimed rounds;
rows report medians over rounds. Run it on a quiet machine: it reports what it measures and nothing else.

    python scripts/lte_decode.py --active 0.5 0.25 --rounds 5 --json docs/journal/bench/lte_decode.jsonl
    python scripts/lte_decode.py --lte runs/lte_sft/final --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import transformers

from sat_trainer import apply_lte, load_lte
from sat_trainer.app.step_timing import interleaved

SHAPES = {
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    # seconds-sized, for tests
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
    ),
}


class _Stamps(transformers.LogitsProcessor):
    """Records ``time.perf_counter()`` each time ``generate`` has the logits of a new token."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def timed_generate(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens per second) of one greedy batch-1 ``generate``."""
    stamps = _Stamps()
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            logits_processor=transformers.LogitsProcessorList([stamps]),
        )
    times = stamps.times
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def mlp_width(model: torch.nn.Module) -> int:
    """The intermediate size of the first decoder layer's MLP, read off its weights."""
    return model.model.layers[0].mlp.up_proj.weight.shape[0]


def random_model(config: transformers.PretrainedConfig, seed: int, **overrides) -> torch.nn.Module:
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().eval()


def calibrate(model: torch.nn.Module, handle, prompt: torch.Tensor, active: float) -> float:
    """Set the threshold to the ``1 - active`` quantile of the routers' scores on ``prompt`` (all layers)."""
    scores: list[torch.Tensor] = []
    hooks = [b.router.register_forward_hook(lambda m, args, out: scores.append(out.flatten())) for b in handle.blocks]
    with torch.inference_mode():
        model(prompt)
    for hook in hooks:
        hook.remove()
    handle.config.threshold = float(torch.quantile(torch.cat(scores), 1 - active))
    return handle.config.threshold


def decode_fraction(model: torch.nn.Module, handle, prompt: torch.Tensor, new_tokens: int) -> float:
    """The mean fraction of experts selected per routed MLP call while decoding (one token per call), untimed."""
    counts = torch.zeros(2)

    def count(module, args, out):
        if out.shape[:-1].numel() == 1:
            counts.add_(torch.tensor([float((out > handle.config.threshold).sum()), out.numel()]))

    hooks = [b.router.register_forward_hook(count) for b in handle.blocks]
    timed_generate(model, prompt, new_tokens)
    for hook in hooks:
        hook.remove()
    return float(counts[0] / counts[1])


def build_variants(args) -> tuple[dict[str, torch.nn.Module], dict[str, dict], torch.Tensor]:
    """The models to time by name, what each row says about its model, and the prompt."""
    if args.lte:
        dense = transformers.AutoModelForCausalLM.from_pretrained(args.lte, attn_implementation="sdpa").float().eval()
    else:
        dense = random_model(transformers.LlamaConfig(**SHAPES[args.shape]), args.seed)
    vocab = dense.get_input_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    plans = []
    for active in [None] if args.lte else args.active:
        lte = copy.deepcopy(dense)
        if args.lte:
            handle = load_lte(lte, args.lte)
        else:
            handle = apply_lte(lte, {"expert_size": args.expert_size, "kmeans_iterations": 2})  # random weights: any grouping
            handle.set_stage("hard")
            calibrate(lte, handle, prompt, active)
        plans.append((active, lte, handle))
    models = {"dense": dense}
    info = {"dense": {"target_active": None, "active_fraction": 1.0, "mlp_width": mlp_width(dense), "threshold": None}}
    for active, lte, handle in plans:
        reached = decode_fraction(lte, handle, prompt, args.new_tokens)
        width = max(1, round(reached * mlp_width(dense)))
        tag = f"@{active}" if active is not None else ""
        models[f"lte{tag}"] = lte
        models[f"bound{tag}"] = random_model(dense.config, args.seed + 1, intermediate_size=width)
        common = {"target_active": active, "threshold": handle.config.threshold}
        info[f"lte{tag}"] = {**common, "active_fraction": reached, "mlp_width": mlp_width(lte)}
        info[f"bound{tag}"] = {
            **common,
            "active_fraction": width / mlp_width(dense),
            "mlp_width": mlp_width(models[f"bound{tag}"]),
        }
    return models, info, prompt


def run(args) -> list[dict]:
    """Time every variant interleaved; one row per variant (medians over the timed rounds)."""
    models, info, prompt = build_variants(args)
    steps = {name: (lambda m=model: timed_generate(m, prompt, args.new_tokens)) for name, model in models.items()}
    times = interleaved(steps, args.warmup, args.rounds)
    dense_rate = statistics.median(rate for _, rate in times["dense"])
    rows = []
    for name, samples in times.items():
        rate = statistics.median(r for _, r in samples)
        rows.append(
            {
                "variant": name.split("@")[0],
                **info[name],
                "prefill_s": statistics.median(p for p, _ in samples),
                "decode_tokens_per_s": rate,
                "decode_speedup": rate / dense_rate,
                **context(args),
            }
        )
    for row in rows:  # LTE's share of its bound's speed-up
        if row["variant"] == "lte":
            bound = next(r for r in rows if r["variant"] == "bound" and r["target_active"] == row["target_active"])
            row["of_bound"] = row["decode_tokens_per_s"] / bound["decode_tokens_per_s"]
    return rows


def context(args) -> dict:
    """What a JSON row needs besides its numbers to be reproduced."""
    return {
        "shape": "saved" if args.lte else args.shape,
        "lte_folder": args.lte,
        "expert_size": args.expert_size,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "device": "cpu",
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2", help="the random model's shape")
    p.add_argument("--active", type=float, nargs="+", default=[0.5, 0.25], help="target fractions of experts run per token")
    p.add_argument("--expert-size", type=int, default=32, help="neurons per expert (the paper's 32)")
    p.add_argument("--lte", help="a folder with a saved model and its lte.safetensors: time it instead of a random model")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per timed call")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each: one call per variant)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="append the rows to this JSON-lines file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = parser().parse_args(argv)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode is timed from the first generated token on)")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args)
    print("| variant | target | active | MLP width | prefill s | decode tok/s | vs dense | of bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        of_bound = f"{r['of_bound']:.2f}" if "of_bound" in r else ""
        print(
            f"| {r['variant']} | {r['target_active'] or ''} | {r['active_fraction']:.3f} | {r['mlp_width']} | "
            f"{r['prefill_s']:.4f} | {r['decode_tokens_per_s']:.1f} | {r['decode_speedup']:.2f}x | {of_bound} |"
        )
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
