"""SAT in your own training loop: ``apply_sat`` patches the model, the loop sets the rate and starts each step.

    python examples/custom_loop.py                                        # a tiny random Llama, offline, seconds
    python examples/custom_loop.py --model HuggingFaceTB/SmolLM2-135M --steps 100

What ``SATCallback`` does inside a Trainer, written out: the scheduled omission rate before each optimizer step,
``new_step()`` so the step's first forward draws a new kept set (reused by every micro-batch of the step and by
gradient-checkpoint recompute), ``remove_sat`` at the end to put the original forwards back.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from tiny_model import TEXT, load

from sat_trainer import SATConfig, apply_sat, remove_sat
from sat_trainer.schedule import omission_rate_at


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a local folder or hub name; 'tiny' builds a random one offline")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/example_custom_loop")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    batch = tokenizer(TEXT[:4], padding=True, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    config = SATConfig(omission_rate=0.5)  # the defaults: a dense start, then rate 0.5 in backward to the end
    handle = apply_sat(model, config)  # patches the MLP blocks in place; starts at rate 0 (original forwards)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    history = []
    for step, inputs in zip(range(args.steps), itertools.repeat(batch)):  # your data loader here
        handle.set_rate(omission_rate_at(config, step, args.steps))
        handle.new_step()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        kept = {name: len(index) for name, index in handle.kept().items()}
        history.append({"step": step, "rate": handle.rate, "loss": loss.item(), "kept": kept})
        print(
            f"step {step}: omission rate {handle.rate:.2f}, loss {loss.item():.4f}, kept per block {sorted(set(kept.values()))}"
        )
    remove_sat(model)  # the original forwards, bit-identical; the weights are plain transformers weights
    model.save_pretrained(f"{args.output_dir}/final")
    return {"history": history, "model": model}


if __name__ == "__main__":
    main()
