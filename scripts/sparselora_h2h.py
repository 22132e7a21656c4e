"""Head-to-head on this CPU: dense LoRA, SparseLoRA (z-lab's own code) and SAT-LoRA on one SFT scenario.

The three variants train in one process, in lockstep: each optimizer step runs once per variant on the same batch
(the order rotating every step, as ``sat_trainer.app.step_timing.interleaved`` does), so a change of machine load
hits all three alike and their step times compare pair by pair. Each starts from the same weights and the same
LoRA initialisation; each has its own optimizer and learning-rate schedule, built as the Trainer builds them from
the scenario's ``training:`` section (``optim``, ``learning_rate``, ``lr_scheduler_type``, warm-up,
``max_grad_norm``); the batches are the scenario's training set in one seeded random order, the same for all.
After the last step each variant's held-out loss is evaluated on the scenario's first held-out set with its
sparsity off (SparseLoRA evaluates its trained adapter in a separate, dense process; SAT is dense in ``eval()``).

* dense: peft LoRA.
* sparselora: SparseLoRA's code from ``--sparselora-src`` (a git mirror or checkout of z-lab/sparselora; nothing
  of it is vendored here) with its shipped sparsity config (``--sparselora-config``, from that source) mapped to
  this model's depth (:func:`sparselora_port.shipped_ratios`) or one ``--mlp-ratio`` on the layers the config
  makes sparse. What is ported to run on a CPU, and why: ``scripts/sparselora_port.py``'s docstring. Its
  attention sparsity is not run (flash-attn): MLP only.
* sat: ``sat_trainer`` on the same peft model, with the scenario's ``sat:`` section (``--set sat.key=value``
  changes it, e.g. ``sat.omission_rate=0.9 sat.omit_in=forward_backward sat.dense_layers=[0,1,2,29]``).

LoRA: the scenario's ``lora:`` section, or ``--lora-config``'s (default: configs/llama2_7b_sft_lora.yaml, the
shipped LoRA SFT recipe); ``--lora-targets attention`` narrows it to q/k/v/o, SparseLoRA's default targets (with
LoRA on the MLP, SparseLoRA runs its Unsloth MLP path, see the port's item 3).

Reported per variant: held-out loss, median step time over all steps and over the steps where the variant is
sparse, the median over steps of its time over dense's in the same step, and SparseLoRA's dense-token share per
row (its band from the first to the last label of the batch). ``--json PATH`` writes the rows.

Examples:
    python scripts/sparselora_h2h.py --sparselora-src /path/to/sparselora --json runs/h2h.json
    python scripts/sparselora_h2h.py --sparselora-src SRC --set training.max_steps=3 data.max_eval_samples=16
    python scripts/sparselora_h2h.py --sparselora-src SRC --mlp-ratio 0.9 --set sat.omission_rate=0.9 \\
        --variants dense sparselora sat
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparselora_port  # noqa: E402

from sat_trainer import SATConfig, apply_sat  # noqa: E402
from sat_trainer.app import data as sat_data  # noqa: E402
from sat_trainer.app.builtin_models import resolve_model_path  # noqa: E402
from sat_trainer.app.run_config import load_run_config  # noqa: E402
from sat_trainer.app.step_timing import paired_ratio  # noqa: E402
from sat_trainer.app.training_args import training_arguments  # noqa: E402
from sat_trainer.schedule import omission_rate_at  # noqa: E402
from sat_trainer.step_driver import StepDriver  # noqa: E402
from sat_trainer.yaml_io import load_yaml_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("dense", "sparselora", "sat")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


class Variant:
    """One trained model: its optimizer and schedule, and the hooks its method adds around a step."""

    def __init__(self, name: str, model: torch.nn.Module, args, max_steps: int):
        self.name, self.model, self.max_steps = name, model, max_steps
        optimizer_cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args, model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer_cls(self.params, **kwargs)
        self.scheduler = transformers.get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=args.get_warmup_steps(max_steps),
            num_training_steps=max_steps,
        )
        self.max_grad_norm = args.max_grad_norm
        self.times: list[float] = []
        self.sparse_steps: list[bool] = []
        self.losses: list[float] = []

    def begin(self, step: int) -> bool:
        """Before step ``step``'s forward; True when the method runs sparse in this step."""
        return False

    def scope(self):
        return contextlib.nullcontext()

    def before_optimizer(self) -> None:
        pass

    def after_optimizer(self) -> None:
        pass

    def step(self, step: int, batch: dict[str, torch.Tensor], seed: int) -> None:
        """One optimizer step as the Trainer takes it (one micro-batch), timed from the method's step hook to the
        zeroed gradients. The RNG is seeded per step, so every variant draws the same LoRA dropout masks."""
        torch.manual_seed(seed * 100_003 + step)
        start = time.perf_counter()
        sparse = self.begin(step)
        with self.scope():
            loss = self.model(**batch).loss
            loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.before_optimizer()
        self.optimizer.step()
        self.after_optimizer()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - start)
        self.sparse_steps.append(sparse)
        self.losses.append(float(loss.detach()))


class SparseLoRAVariant(Variant):
    def __init__(self, wrapped: sparselora_port.SparseLoRAModel, args, max_steps: int):
        super().__init__("sparselora", wrapped.model, args, max_steps)
        self.wrapped = wrapped
        self.splits: list[tuple[int, int]] = []

    def begin(self, step: int) -> bool:
        return self.wrapped.set_step(step, self.max_steps)

    def scope(self):
        return self.wrapped.active()

    def after_optimizer(self) -> None:
        split = self.wrapped.token_split()
        if split is not None:
            self.splits.append(split)
        for module in self.wrapped.sparse_modules():
            module.stats.clear()


class SATVariant(Variant):
    def __init__(self, model: torch.nn.Module, sat: SATConfig, args, max_steps: int):
        super().__init__("sat", model, args, max_steps)
        self.sat = sat
        self.handle = apply_sat(model, sat)
        self.driver = StepDriver(self.handle, sat)

    def begin(self, step: int) -> bool:
        rate = omission_rate_at(self.sat, step, self.max_steps)
        self.driver.begin_step(rate)
        return rate > 0

    def before_optimizer(self) -> None:
        self.driver.before_optimizer_step(self.optimizer)

    def after_optimizer(self) -> None:
        self.driver.after_optimizer_step()


def lora_settings(cfg, args: argparse.Namespace) -> dict[str, Any]:
    """The peft ``LoraConfig`` fields: the scenario's, else ``--lora-config``'s; narrowed by ``--lora-targets``."""
    lora = dict(cfg.lora or load_yaml_file(Path(args.lora_config))["lora"])
    if args.lora_targets == "attention":
        lora["target_modules"] = list(ATTENTION)
    return lora


def train_batches(train_set, collator, seed: int, batch_size: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches of the training set in a seeded random order (a new permutation per epoch), the same for
    every variant."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(len(train_set), generator=generator).tolist()
    return [collator([train_set[i] for i in order[k * batch_size : (k + 1) * batch_size]]) for k in range(steps)]


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, eval_set, collator, batch_size: int) -> float:
    """The Trainer's ``eval_loss``: the mean of the batches' losses, each weighted by its rows."""
    model.eval()
    total, rows = 0.0, 0
    for start in range(0, len(eval_set), batch_size):
        batch = collator([eval_set[i] for i in range(start, min(start + batch_size, len(eval_set)))])
        n = batch["input_ids"].shape[0]
        total += float(model(**batch).loss) * n
        rows += n
    model.train()
    return total / rows


def build_variants(
    args: argparse.Namespace, cfg, tokenizer, model_path: str, lora: dict, steps: int, args_tr
) -> dict[str, Variant]:
    """The variants named by ``--variants``, each on its own copy of the model with the same LoRA initialisation."""
    import peft

    def base() -> torch.nn.Module:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        torch.manual_seed(args_tr.seed)  # the same LoRA initialisation in every variant
        return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora)).train()

    built: dict[str, Variant] = {}
    for name in args.variants:
        if name == "dense":
            built[name] = Variant("dense", base(), args_tr, steps)
        elif name == "sat":
            built[name] = SATVariant(base(), cfg.sat, args_tr, steps)
        else:
            model = base()
            layers = model.get_base_model().config.num_hidden_layers
            shipped = sparselora_config(args)
            mlp, _ = sparselora_port.shipped_ratios(shipped, layers)
            if args.mlp_ratio is not None:
                mlp = [args.mlp_ratio if r > 0 else 0.0 for r in mlp]
            spft = sparselora_port.load_spft(Path(args.sparselora_src), args.sparselora_commit)
            wrapped = sparselora_port.sparsify(
                spft,
                model,
                shipped=shipped,
                mlp_ratios=mlp,
                lora_targets=list(lora["target_modules"]),
                predictor_dir=Path(args.work_dir) / "low_rank_weights",
                model_id=Path(model_path).name,
                batch_size=args_tr.per_device_train_batch_size,
                max_length=cfg.data.max_length,
                padding_side=tokenizer.padding_side,
            )
            built[name] = SparseLoRAVariant(wrapped, args_tr, steps)
    return built


def sparselora_config(args: argparse.Namespace) -> dict:
    """The shipped sparsity config named by ``--sparselora-config``, read from the SparseLoRA source."""
    import yaml

    src = Path(args.sparselora_src)
    name = f"configs/sparsity/{args.sparselora_config}"
    if (src / name).is_file():
        return yaml.safe_load((src / name).read_text())
    text = subprocess.run(
        ["git", "-C", str(src), "show", f"{args.sparselora_commit}:{name}"], capture_output=True, text=True, check=True
    ).stdout
    return yaml.safe_load(text)


def lockstep(variants: dict[str, Variant], batches: list[dict], seed: int, log: Callable[[str], None]) -> None:
    """Train every variant one step per batch, the order rotating by one each step."""
    names = list(variants)
    for step, batch in enumerate(batches):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            variants[name].step(step, batch, seed)
        log(
            f"step {step + 1}/{len(batches)}: "
            + ", ".join(f"{n} {variants[n].times[-1]:.2f}s loss {variants[n].losses[-1]:.4f}" for n in names)
        )


def rows(variants: dict[str, Variant], losses: dict[str, float], meta: dict) -> list[dict]:
    dense = variants.get("dense")
    out = []
    for name, v in variants.items():
        sparse_times = [t for t, s in zip(v.times, v.sparse_steps) if s]
        row = {
            "variant": name,
            "steps": len(v.times),
            "held_out_loss": losses[name],
            "step_time_median_s": statistics.median(v.times),
            "sparse_step_time_median_s": statistics.median(sparse_times) if sparse_times else None,
            "sparse_steps": sum(v.sparse_steps),
            "step_times_s": v.times,
            "train_losses": v.losses,
            **meta,
        }
        if dense is not None and name != "dense":
            row["paired_ratio_vs_dense"] = paired_ratio(v.times, dense.times)
            paired = [(t, d) for t, d, s in zip(v.times, dense.times, v.sparse_steps) if s]
            row["paired_ratio_vs_dense_sparse_steps"] = paired_ratio(*zip(*paired)) if paired else None
        if isinstance(v, SparseLoRAVariant):
            row["sparselora_mlp_ratios"] = [m.sparsity for m in v.wrapped.sparse_modules()]
            row["sparselora_dense_token_share"] = statistics.mean(d / (s + d) for s, d in v.splits) if v.splits else None
        if isinstance(v, SATVariant):
            row["sat"] = v.sat.to_dict()
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparselora-src", required=True, help="git mirror or checkout of z-lab/sparselora")
    p.add_argument("--sparselora-commit", default="HEAD", help="commit to extract from a git mirror")
    p.add_argument("--sparselora-config", default="llama3-8b-math10k.yaml", help="a file of its configs/sparsity/")
    p.add_argument("--mlp-ratio", type=float, help="one MLP ratio for every layer the shipped config makes sparse")
    p.add_argument("--config", default=str(ROOT / "configs" / "smollm2_sft.yaml"), help="sat-train SFT scenario")
    p.add_argument(
        "--lora-config",
        default=str(ROOT / "configs" / "llama2_7b_sft_lora.yaml"),
        help="lora: section used when the scenario has none",
    )
    p.add_argument("--lora-targets", choices=("config", "attention"), default="config")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="scenario overrides, as sat-train's --set")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "sparselora_h2h"), help="SVD predictors are cached here")
    p.add_argument("--json", help="write the rows (a JSON list) to this file")
    args = p.parse_args(argv)

    cfg = load_run_config("sft", args.config, args.set)
    if "sat" in args.variants and cfg.sat is None:
        p.error(f"{args.config} has no sat: section for the sat variant")
    model_path = resolve_model_path(cfg.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    train_set, eval_sets, collator = sat_data.build_datasets("sft", cfg.data, tokenizer)
    eval_name, eval_set = next(iter(eval_sets.items()))
    steps = int(cfg.training["max_steps"])
    args_tr = training_arguments(cfg.training, has_eval=False, output_dir=str(Path(args.work_dir) / "trainer"))
    lora = lora_settings(cfg, args)
    variants = build_variants(args, cfg, tokenizer, model_path, lora, steps, args_tr)
    batches = train_batches(train_set, collator, args_tr.seed, args_tr.per_device_train_batch_size, steps)
    log = functools.partial(print, flush=True)
    log(f"{len(variants)} variants, {steps} steps of {args_tr.per_device_train_batch_size} rows, LoRA {lora}")
    lockstep(variants, batches, args_tr.seed, log)
    losses = {}
    for name, v in variants.items():
        if isinstance(v, SparseLoRAVariant):
            v.wrapped.set_enabled(False)
            with v.wrapped.active():
                losses[name] = held_out_loss(v.model, eval_set, collator, args_tr.per_device_eval_batch_size)
        else:
            losses[name] = held_out_loss(v.model, eval_set, collator, args_tr.per_device_eval_batch_size)
    commit = sparselora_port.source_commit(Path(args.sparselora_src)) if "sparselora" in variants else None
    meta = {"config": args.config, "overrides": args.set, "eval_set": eval_name, "eval_rows": len(eval_set), "lora": lora}
    meta.update({"sparselora_commit": commit, "sparselora_config": args.sparselora_config, "mlp_ratio": args.mlp_ratio})
    result = rows(variants, losses, meta)
    for row in result:
        ratio = row.get("paired_ratio_vs_dense_sparse_steps")
        log(
            f"{row['variant']:>10}: held-out {row['held_out_loss']:.4f}, median step {row['step_time_median_s']:.3f}s"
            + (f", sparse steps vs dense {ratio:.3f}x time" if ratio else "")
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
