"""SAT with TRL's `SFTTrainer` and a PEFT LoRA adapter: the same one callback.

    python examples/sft_lora_trl.py                                       # a tiny random Llama, offline, seconds
    python examples/sft_lora_trl.py --model Qwen/Qwen2.5-0.5B-Instruct --max-steps 200

SAT slices the frozen base weights and the LoRA ``lora_A``/``lora_B`` of the same channels together.
``sparse_tokens: context`` keeps the tokens that carry the loss (the completions) dense and omits channels for
the prompt tokens only, the SFT recipe measured best (``configs/smollm2_sft.yaml``).
"""

from __future__ import annotations

import argparse

import datasets
import peft
import torch
import trl
from tiny_model import CHATS, load

from sat_trainer import SATCallback, SATConfig


def main(argv: list[str] | None = None) -> trl.SFTTrainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a local folder or hub name; 'tiny' builds a random one offline")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--output-dir", default="runs/example_sft_lora")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model)
    records = [  # prompt/completion conversations: the loss is on the completion only
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in CHATS
    ]
    lora = peft.LoraConfig(
        r=8,
        lora_alpha=16,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    training = trl.SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        max_length=128,
        bf16=torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
    )
    sat = SATConfig(omit_in="backward", omission_rate=0.5, sparse_tokens="context")
    trainer = trl.SFTTrainer(
        model=model,
        args=training,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[SATCallback(sat)],
    )
    trainer.train()
    trainer.model.merge_and_unload().save_pretrained(f"{args.output_dir}/final")  # a plain model, adapter merged in
    return trainer


if __name__ == "__main__":
    main()
