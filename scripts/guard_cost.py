"""What the non-finite guard costs a normal `sat-train` run: train-step time with and without it.

A small Llama (the embedded base's shape, random weights, random tokens) is trained for
``--steps`` steps (8 x ``--length`` tokens each) by the Trainer with ``sat-train``'s defaults (fused AdamW, a log every 10
steps), once with :class:`sat_trainer.app.guard.NonFiniteGuard` and once without, alternating
(A B A B ...) ``--pairs`` times so that drift of a shared machine hits both alike. The time is
``ReportCallback``'s time inside training steps (evaluation and start-up excluded); the first
``--warmup`` steps of each run are left out. Prints one JSON line with the medians.

    python scripts/guard_cost.py --steps 40 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile

import torch
import transformers
from datasets import Dataset

from sat_trainer.app.guard import NonFiniteGuard
from sat_trainer.app.report import ReportCallback


def step_time(guarded: bool, steps: int, warmup: int, length: int, out: str) -> float:
    """Median seconds per optimizer step after ``warmup`` steps."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, config.vocab_size, (8 * steps, length))
    data = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": tokens.tolist()})
    args = transformers.TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        optim="adamw_torch_fused",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    record = ReportCallback()
    callbacks = [NonFiniteGuard(), record] if guarded else [record]
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    times = [b["train_time_s"] - a["train_time_s"] for a, b in zip(record.steps, record.steps[1:])]
    return statistics.median(times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (batch of 8)")
    opts = parser.parse_args()
    runs: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(opts.pairs):
            for name in runs:
                runs[name].append(step_time(name == "with", opts.steps, opts.warmup, opts.length, out))
    ratios = [w / n for w, n in zip(runs["with"], runs["without"])]
    print(
        json.dumps(
            {
                "steps": opts.steps,
                "pairs": opts.pairs,
                "tokens_per_step": 8 * opts.length,
                "threads": torch.get_num_threads(),
                "step_s_without_guard": [round(t, 4) for t in runs["without"]],
                "step_s_with_guard": [round(t, 4) for t in runs["with"]],
                "median_step_s_without": round(statistics.median(runs["without"]), 4),
                "median_step_s_with": round(statistics.median(runs["with"]), 4),
                "median_ratio_with_over_without": round(statistics.median(ratios), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
