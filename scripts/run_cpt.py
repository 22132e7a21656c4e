"""Continual pre-training with SAT: the same as `sat-train cpt` (see its --help)."""

import sys

from sat_trainer.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["cpt", *sys.argv[1:]]))
