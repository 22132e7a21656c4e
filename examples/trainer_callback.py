"""SAT in a plain `transformers.Trainer`: the model, data and arguments stay yours, SAT is one callback.

    python examples/trainer_callback.py                                   # a tiny random Llama, offline, seconds
    python examples/trainer_callback.py --model HuggingFaceTB/SmolLM2-135M --text corpus.txt --max-steps 200

Each line of ``--text`` is one training sequence (``sat-train cpt`` packs documents into blocks instead).
The callback patches the model when the Trainer is built, sets the scheduled omission rate each step, runs
evaluation dense and logs ``sat/omission_rate``, ``sat/kept_flops_fraction`` and ``sat/tokens_per_second``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import transformers
from tiny_model import TEXT, load

from sat_trainer import SATCallback, SATConfig


def main(argv: list[str] | None = None) -> transformers.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a local folder or hub name; 'tiny' builds a random one offline")
    parser.add_argument("--text", help="a text file, one training sequence per line (default: a few built-in lines)")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--omission-rate", type=float, default=0.5)
    parser.add_argument("--output-dir", default="runs/example_trainer")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    lines = Path(args.text).read_text().splitlines() if args.text else TEXT
    dataset = [tokenizer(line, truncation=True, max_length=256) for line in lines if line.strip()]
    training = transformers.TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    sat = SATConfig(omission_rate=args.omission_rate)  # every other key at its default: docs/configuration.md
    trainer = transformers.Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[SATCallback(sat)],
    )
    trainer.train()
    trainer.save_model(f"{args.output_dir}/final")  # a plain transformers model: no sat_trainer needed to load it
    return trainer


if __name__ == "__main__":
    main()
