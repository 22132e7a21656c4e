"""`sat-train`: continual pre-training and fine-tuning with SAT from one YAML file.

    sat-train cpt --config configs/demo_cpt.yaml [--set training.max_steps=50 ...] [--compare-dense]
    sat-train sft --config configs/demo_sft.yaml
    sat-train pretrain-base [--output DIR] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SATError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sat-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for task, what in (("cpt", "continual pre-training (packed text)"), ("sft", "supervised fine-tuning (chat records)")):
        p = sub.add_parser(task, help=what)
        p.add_argument("--config", required=True, help="scenario YAML (see configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.max_steps=20 or sat.omission_rate=0.3")
        p.add_argument("--compare-dense", action="store_true", help="also run the same config dense and print a side-by-side table")
    p = sub.add_parser("pretrain-base", help="build (once) the small pretrained base the demo configs use")
    p.add_argument("--output", help="folder to build into (default: the cache folder the demos read)")
    p.add_argument("--force", action="store_true", help="rebuild even if the base exists")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("sat_trainer").setLevel(logging.INFO)
    try:
        if args.command == "pretrain-base":
            return _pretrain_base(args)
        return _train(args)
    except SATError as err:
        print(f"sat-train: error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from .report import comparison_table, plot_comparison
    from .run import run
    from .run_config import load_run_config

    cfg = load_run_config(args.command, args.config, args.set)
    if not args.compare_dense:
        report = run(cfg)
        _print_summary(report, cfg.output_dir)
        return 0
    sat = run(cfg, output_dir=cfg.output_dir / "sat")
    dense = run(cfg, dense=True, output_dir=cfg.output_dir / "dense")
    table = comparison_table(sat, dense)
    (cfg.output_dir / "compare.md").write_text(table + "\n")
    plot_comparison(sat, dense, cfg.output_dir / "report.png")
    print("\n" + table)
    print(f"\nrun folders: {cfg.output_dir / 'sat'} and {cfg.output_dir / 'dense'}; curves: {cfg.output_dir / 'report.png'}")
    return 0


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
    print(
        f"\n{report['mode']} run: {report['steps']} steps, {report['train_time_s']:.1f} s in train steps "
        f"({report['wall_time_s']:.1f} s wall), {report['tokens_per_second']:.0f} tokens/s, "
        f"held-out loss {json.dumps(report['held_out_loss'])}"
    )
    print(f"run folder: {out} (final/, report.json, report.png)")


if __name__ == "__main__":
    sys.exit(main())
