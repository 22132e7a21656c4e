"""Supervised fine-tuning with SAT: the same as `sat-train sft` (see its --help)."""

import sys

from sat_trainer.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["sft", *sys.argv[1:]]))
