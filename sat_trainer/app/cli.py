"""`sat-train`: continual pre-training, fine-tuning and pre-training from scratch with SAT (or LTE) from one YAML file.

    sat-train cpt --config configs/demo_cpt.yaml [--set training.max_steps=50 ...] [--compare-dense]
    sat-train sft --config configs/demo_sft.yaml
    sat-train pretrain --config configs/pretrain_llama_python.yaml [--compare-dense]   (from a model shape, random init)
    sat-train sft --config configs/smollm2_lte_sft.yaml [--compare-dense]   (LTE: an lte: section, experimental)
    sat-train pretrain-base [--output DIR] [--force]

Checkpoints: --set training.save_steps=50 saves one every 50 steps in the run folder
(training.output_dir). An interrupted run continues from its latest checkpoint with the same
command plus --resume (same ladder, kept-set draws and data order), or from a given one with
--set training.resume_from_checkpoint=RUN/checkpoint-N. A run folder that already holds
checkpoints is refused unless --resume or --overwrite (deletes them) is given.

Exit status: 0 done, 2 bad input (one line naming the file, key or line), 1 training diverged.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SATConfigError, SATError, SATTrainingError

if TYPE_CHECKING:
    from .run_config import RunConfig

# What only sat-train imports (the cli extra); `pip install sat_trainer` alone installs the engine.
APP_PACKAGES = ("datasets", "matplotlib", "tokenizers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sat-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = (
        ("cpt", "continual pre-training (packed text)"),
        ("sft", "supervised fine-tuning (chat records)"),
        ("pretrain", "pre-training from scratch: a model shape initialised at random, its BPE trained on the corpus"),
    )
    for task, what in tasks:
        p = sub.add_parser(task, help=what)
        p.add_argument("--config", required=True, help="scenario YAML (see configs/)")
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override, e.g. training.max_steps=20 or sat.omission_rate=0.3",
        )
        p.add_argument(
            "--compare-dense",
            action="store_true",
            help="also run the same config dense (same seed and data) and print a side-by-side table",
        )
        p.add_argument(
            "--timing-rounds",
            type=int,
            default=5,
            metavar="N",
            help="--compare-dense: rounds of dense and SAT steps timed "
            "in turn in one process (dense's median, SAT's by same-round ratios; they size the equal-time run); 0: use the runs' own times",
        )
        p.add_argument(
            "--resume",
            action="store_true",
            help="continue from the latest checkpoint in the run folder (same ladder, draws, data order)",
        )
        p.add_argument("--overwrite", action="store_true", help="delete the run folder's checkpoints and start over")
    p = sub.add_parser("pretrain-base", help="build (once) the small pretrained base the demo configs use")
    p.add_argument("--output", help="folder to build into (default: the cache folder the demos read)")
    p.add_argument("--force", action="store_true", help="rebuild even if the base exists")
    args = parser.parse_args(argv)
    missing = [name for name in APP_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f'sat-train: error: {", ".join(missing)} not installed; sat-train needs: pip install "sat_trainer[cli]"',
            file=sys.stderr,
        )
        return 2

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("sat_trainer").setLevel(logging.INFO)
    from .cpu_memory import keep_freed_memory

    keep_freed_memory()
    try:
        if args.command == "pretrain-base":
            return _pretrain_base(args)
        return _train(args)
    except SATTrainingError as err:
        print(f"sat-train: error: {err}", file=sys.stderr)
        return 1
    except SATError as err:
        print(f"sat-train: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .run_config import load_run_config
    from .run_folder import clear_checkpoints, first_missing, remove_empty, resume_point

    cfg = load_run_config(args.command, args.config, args.set)
    explicit = cfg.training.get("resume_from_checkpoint")
    if args.compare_dense and cfg.sat is None and cfg.lte is None:
        raise SATConfigError(
            f"{args.config}: --compare-dense needs a 'sat:' section or an 'lte:' section (without either both runs would be dense)"
        )
    if args.timing_rounds < 0:
        raise SATConfigError(
            f"--timing-rounds has invalid value {args.timing_rounds}; allowed: 0 (no interleaved timing) or more rounds"
        )
    if args.compare_dense and explicit is not None:
        raise SATConfigError("training.resume_from_checkpoint names one checkpoint; with --compare-dense use --resume")
    folders = list(compare_folders(cfg).values()) if args.compare_dense else [cfg.output_dir]
    starts = {
        f: resume_point(f, explicit=explicit, resume=args.resume, overwrite=args.overwrite, required=not args.compare_dense)
        for f in folders
    }
    if args.compare_dense and args.resume and not any(starts.values()):
        raise SATConfigError(
            f"nothing to resume: none of {', '.join(str(f) for f in folders)} holds a checkpoint; run without --resume"
        )
    if args.overwrite:
        for folder in folders:
            clear_checkpoints(folder)
    new = {first_missing(f) for f in folders} - {None}
    try:
        return _run(args, cfg, starts)
    except BaseException:
        for folder in new:  # a run that failed before writing anything leaves no empty folder
            remove_empty(folder)
        raise


def _run(args: argparse.Namespace, cfg: RunConfig, starts: dict[Path, str | None]) -> int:
    from .report import equal_time_steps, write_comparison
    from .run import run, time_steps

    if not args.compare_dense:
        report = run(cfg, resume_from=starts[cfg.output_dir])
        _print_summary(report, cfg.output_dir)
        return 0
    folders = compare_folders(cfg)
    dense = run(cfg, dense=True, output_dir=folders["dense"], resume_from=starts[folders["dense"]])
    if cfg.lte is not None:  # quality at equal steps; LTE's speed is inference's (scripts/lte_decode.py), not training's
        lte = run(cfg, output_dir=folders["lte"], resume_from=starts[folders["lte"]])
        table = write_comparison(cfg.output_dir, dense, [("LTE", lte)])
        print("\n" + table)
        if lte.get("lte") is not None:
            from .lte_run import summary_lines

            print("\n" + "\n".join(summary_lines(lte["lte"])))
        print(f"\nrun folders: {', '.join(str(f) for f in folders.values())}; curves: {cfg.output_dir / 'report.png'}")
        return 0
    runs = [("SAT, equal steps", run(cfg, output_dir=folders["sat"], resume_from=starts[folders["sat"]]))]
    times = None
    if args.timing_rounds > 0:  # the speed side, robust to machine drift between the sequential runs
        times = time_steps(
            cfg, dense["steps"], calibration=runs[0][1].get("sat_calibration"), rounds=args.timing_rounds, reuse=args.resume
        )
    if "sat_equal_time" in folders:  # CPT: SAT gets the steps that fit in dense's train-step time, its schedule over them
        steps = times.equal_time_steps(cfg.sat, dense["steps"]) if times is not None else equal_time_steps(dense, runs[0][1])
        timed = dataclasses.replace(cfg, training={**cfg.training, "max_steps": steps})
        runs.append(
            (
                f"SAT, equal time ({steps} steps)",
                run(timed, output_dir=folders["sat_equal_time"], resume_from=starts[folders["sat_equal_time"]]),
            )
        )
    table = write_comparison(cfg.output_dir, dense, runs, times, cfg.sat)
    print("\n" + table)
    print(f"\nrun folders: {', '.join(str(f) for f in folders.values())}; curves: {cfg.output_dir / 'report.png'}")
    return 0


def compare_folders(cfg: RunConfig) -> dict[str, Path]:
    """The run folders of ``--compare-dense``: dense, SAT at equal steps and, for CPT and pretrain (time to a target
    quality is their protocol; SFT compares at equal steps, its data being epochs), SAT at equal time; with an
    ``lte:`` section, dense and LTE at equal steps."""
    if cfg.lte is not None:
        return {name: cfg.output_dir / name for name in ("dense", "lte")}
    names = ["dense", "sat", "sat_equal_time"] if cfg.task in ("cpt", "pretrain") else ["dense", "sat"]
    return {name: cfg.output_dir / name for name in names}


def _pretrain_base(args: argparse.Namespace) -> int:
    from .pretrain import build_base, default_base_dir

    out = Path(args.output) if args.output else default_base_dir()
    if (out / "config.json").is_file() and not args.force:
        print(f"base already built at {out} (use --force to rebuild)")
        return 0
    info = build_base(out)
    print(json.dumps(info, indent=2))
    return 0


def _print_summary(report: dict, out: Path) -> None:
    from .lte_run import summary_lines

    print(
        f"\n{report['mode']} run: {report['steps']} steps, {report['train_time_s']:.1f} s in train steps "
        f"({report['wall_time_s']:.1f} s wall), {report['tokens_per_second']:.0f} tokens/s, "
        f"held-out loss {json.dumps(report['held_out_loss'])}"
    )
    if report.get("lte") is not None:
        print("\n".join(summary_lines(report["lte"])))
    files = "final/ (with lte.safetensors, lte_config.json)" if report.get("lte") is not None else "final/"
    print(f"run folder: {out} ({files}, report.json, report.png)")


if __name__ == "__main__":
    sys.exit(main())
