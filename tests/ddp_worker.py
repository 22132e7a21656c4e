"""A tiny SAT Trainer run, launched once plainly and once under torch.distributed (2 ranks, gloo).

Usage: python ddp_worker.py OUT_DIR METRIC PER_DEVICE_BATCH STEPS [OMIT_IN [SPARSE_TOKENS]]
With SPARSE_TOKENS context, the first 6 tokens of every row are a prompt (label -100).
Writes OUT_DIR/kept_rank<R>.json (kept sets and their scores per step) and, on rank 0, OUT_DIR/final.pt.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from tiny import CountingStream, build, leave_process_group, sat_config  # noqa: E402

from sat_trainer import SATCallback  # noqa: E402
from sat_trainer.patch.model import handle_of  # noqa: E402


class Recorder(transformers.TrainerCallback):
    """Each step's kept sets, and the scores they were drawn from (identical on every rank once averaged)."""

    def __init__(self):
        self.kept, self.scores = {}, {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        handle = handle_of(model)
        self.kept[state.global_step] = {n: k.tolist() for n, k in handle.kept().items()}
        self.scores[state.global_step] = {
            u.name: u.scorer.cached_scores.tolist() for u in handle.units if u.scorer.cached_scores is not None
        }


def main():
    out, metric, batch, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    omit_in = sys.argv[5] if len(sys.argv) > 5 else "forward_backward"
    sparse_tokens = sys.argv[6] if len(sys.argv) > 6 else "all"
    rank = int(os.environ.get("RANK", 0))
    recorder = Recorder()
    args = transformers.TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    split = {"targets": ["mlp"], "sparse_tokens": "context"} if sparse_tokens == "context" else {}
    sat = sat_config(omission_rate=0.5, metric=metric, selection="sampling", ladder_sparse_fraction=0.6, omit_in=omit_in, **split)
    trainer = transformers.Trainer(
        model=build("llama"),
        args=args,
        train_dataset=CountingStream(prompt=6 if sparse_tokens == "context" else 0),
        callbacks=[SATCallback(sat), recorder],
    )
    trainer.train()
    world = int(os.environ.get("WORLD_SIZE", 1))
    (out / f"kept_rank{rank}.json").write_text(json.dumps({"world": world, "kept": recorder.kept, "scores": recorder.scores}))
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, out / "final.pt")
    leave_process_group()


if __name__ == "__main__":
    main()
