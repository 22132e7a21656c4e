"""`transformers.Trainer` + `SATCallback` under real DeepSpeed ZeRO-2 and ZeRO-3 (CPU accelerator, gloo).

Usage:
  python -m torch.distributed.run --standalone --nproc_per_node 2 deepspeed_worker.py OUT  (with DS_ACCELERATOR=cpu)
  python deepspeed_worker.py OUT --single   (the unsharded reference: one process, the same global batch)

One launch serves every check, so the processes start once: for each ZeRO stage a 4-step run that
saves a checkpoint at step 2, then a second Trainer resuming from it; under ZeRO-3 also a
``Trainer(model_init=...)`` run. Each run writes OUT/<run>_rank<R>.json (kept sets, this rank's
loss per step) and, on rank 0, OUT/<run>.pt (the first step's full gradients, the final weights).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from tiny import VOCAB, build, leave_process_group, sat_config  # noqa: E402

from sat_trainer import SATCallback  # noqa: E402
from sat_trainer.errors import SATError  # noqa: E402
from sat_trainer.patch.model import handle_of  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH = 4, 2, 4
REFERENCE: dict = {}  # the plain build's weights, taken before any DeepSpeed config exists


class Stream(torch.utils.data.Dataset):
    """Equal-length rows (no padding), so each rank's mean loss averages to the global batch's."""

    def __init__(self, rows: int = 64, length: int = 16):
        starts = torch.randint(0, VOCAB, (rows, 1), generator=torch.Generator().manual_seed(0))
        self.ids = (starts + torch.arange(length)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Recorder(transformers.TrainerCallback):
    """Kept sets per optimizer step, read from the model the Trainer trains (unwrapped by it); without
    DeepSpeed also the first step's gradients (the plain optimizer has not stepped yet here)."""

    def __init__(self):
        self.kept: dict[int, dict] = {}
        self.grads: dict = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.kept[state.global_step] = {n: k.tolist() for n, k in handle_of(model).kept().items()}
        if not self.grads and not args.deepspeed:
            self.grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


class RecordingTrainer(transformers.Trainer):
    """Records this rank's loss per micro-batch (the value the Trainer logs before averaging ranks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []
        self.rows: list[list[int]] = []  # each micro-batch's first tokens: which rows this rank trained on

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses.append(float(loss))
        self.rows.append(inputs["input_ids"][:, 0].tolist())
        return loss


@contextlib.contextmanager
def first_step_grads(enabled: bool):
    """Yields a dict that gets the full reduced gradients of the first optimizer step: DeepSpeed's
    ``engine.step`` is wrapped so that before it runs every rank assembles them
    (``safe_get_full_grad``, a collective under ZeRO-3). accelerate runs ``engine.backward`` and
    ``engine.step`` back to back, so no Trainer callback sees them."""
    grads: dict = {}
    if not enabled:
        yield grads
        return
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    original = deepspeed.DeepSpeedEngine.step

    def step(engine, *args, **kwargs):
        if not grads:
            grads.update({n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()})
        return original(engine, *args, **kwargs)

    deepspeed.DeepSpeedEngine.step = step
    try:
        yield grads
    finally:
        deepspeed.DeepSpeedEngine.step = original


def ds_config(stage: int) -> dict:
    """fp32, no DeepSpeed optimizer section: the Trainer's torch AdamW, no compiled ops.

    No ``train_batch_size``: transformers 5.24 fills an "auto" one while ``TrainingArguments`` is
    built, before it knows the world size (1 then, so 2 x 1 x 2 != 2 on two CPU ranks); DeepSpeed
    derives it from the micro batch, accumulation steps and world size instead."""
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def count_cpu_ranks() -> None:
    """Tell accelerate the world size DeepSpeed runs with on CPU.

    accelerate 1.15's ``PartialState`` picks a process-group backend only for an accelerator
    (nccl, xccl, ...) or for ``cpu=True``, and ``cpu=True`` turns DeepSpeed off; so on CPU it lets
    ``deepspeed.comm`` start gloo itself, then records backend None and one process. Left so, the
    Trainer's data loader is not split over the ranks: every rank trains on the same rows.
    """
    import torch.distributed as dist
    from accelerate.state import PartialState

    state = PartialState()
    if dist.is_initialized() and state.num_processes != dist.get_world_size():
        state.backend = dist.get_backend()
        state.num_processes, state.process_index = dist.get_world_size(), dist.get_rank()
        state.local_process_index = int(os.environ["LOCAL_RANK"])


def training_args(out: Path, batch: int, stage: int | None) -> transformers.TrainingArguments:
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_AT,
        report_to=[],
        seed=0,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        disable_tqdm=True,
        dataloader_drop_last=True,
        max_grad_norm=0.0,
        use_cpu=stage is None,
        deepspeed=ds_config(stage) if stage is not None else None,
    )
    if stage is not None:
        count_cpu_ranks()
    return args


def build_model() -> torch.nn.Module:
    """The tiny Llama as a user's script gets it: under ZeRO-3 ``from_config`` builds it inside
    ``zero.Init``, partitioned (so ``apply_sat`` meets empty shards), but initialised in another
    RNG order than the plain build; its weights are set to the plain build's so every run starts
    from the unsharded reference's weights."""
    import deepspeed
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    model = build("llama")
    if is_deepspeed_zero3_enabled():
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0), torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(REFERENCE[name])
    return model


def leaf_classes(model: torch.nn.Module) -> list[str]:
    """Classes DeepSpeed registered as ZeRO-3 leaves (their parameters carry ``ds_z3_leaf_module``)."""
    return sorted({type(p.ds_z3_leaf_module).__name__ for p in model.parameters() if hasattr(p, "ds_z3_leaf_module")})


def sat() -> SATCallback:
    return SATCallback(sat_config(omission_rate=0.5, metric="magnitude", selection="sampling", ladder_sparse_fraction=0.6))


def full_state(trainer: transformers.Trainer) -> dict:
    """The whole model's weights on every rank, gathered from ZeRO-3 partitions where needed."""
    model = trainer.model
    if trainer.is_deepspeed_enabled:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return {n: p.detach().clone() for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(out: Path, name: str, stage: int | None, batch: int, *, resume: bool = False, model_init: bool = False) -> None:
    """One Trainer run; writes its kept sets, losses, first-step gradients and final weights."""
    rank = int(os.environ.get("RANK", 0))
    args = training_args(out / name.split("-")[0], batch, stage)
    recorder = Recorder()
    kwargs = {"model_init": build_model} if model_init else {"model": build_model()}
    trainer = RecordingTrainer(args=args, train_dataset=Stream(), callbacks=[sat(), recorder], **kwargs)
    checkpoint = str(out / name.split("-")[0] / f"checkpoint-{SAVE_AT}") if resume else None
    with first_step_grads(stage is not None) as grads:
        trainer.train(resume_from_checkpoint=checkpoint)
    grads = grads or recorder.grads
    partitioned = any(hasattr(p, "ds_id") for p in trainer.model.parameters())
    record = {
        "kept": recorder.kept,
        "losses": trainer.losses,
        "rows": trainer.rows,
        "partitioned": partitioned,
        "leaves": leaf_classes(trainer.model),
    }
    (out / f"{name}_rank{rank}.json").write_text(json.dumps(record))
    final = full_state(trainer)
    if rank == 0:
        torch.save({"grads": grads, "final": final}, out / f"{name}.pt")


def main():
    out = Path(sys.argv[1])
    REFERENCE.update({n: p.detach().clone() for n, p in build("llama").named_parameters()})
    if "--single" in sys.argv:
        run(out, "single", None, GLOBAL_BATCH)
        return
    for stage in [int(s) for s in os.environ.get("DS_TEST_STAGES", "2,3").split(",")]:
        run(out, f"zero{stage}", stage, GLOBAL_BATCH // 2)
        run(out, f"zero{stage}-resumed", stage, GLOBAL_BATCH // 2, resume=True)
    try:
        run(out, "zero3_model_init", 3, GLOBAL_BATCH // 2, model_init=True)
    except SATError as err:
        (out / f"zero3_model_init_rank{os.environ['RANK']}.json").write_text(json.dumps({"error": str(err)}))
    leave_process_group()


if __name__ == "__main__":
    main()
