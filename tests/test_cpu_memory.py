"""`sat_trainer.app.cpu_memory`: after it, a freed large tensor's memory is reused, not page-faulted in anew."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from sat_trainer.app.cpu_memory import keep_freed_memory
kept = keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB, every page written
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
counts = [faults() for _ in range(12)]  # the heap grows for the first few (small objects land between the blocks)
print(kept, max(counts[-3:]))
"""


def _faults(opt_out: bool) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "SAT_TRAINER_KEEP_CPU_MEMORY"}
    if opt_out:
        env["SAT_TRAINER_KEEP_CPU_MEMORY"] = "0"
    kept, faults = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    return kept, int(faults)  # the most page faults of the last 3 of 12 allocations of the same size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    kept, control = _faults(opt_out=True)
    assert kept == "False"  # the opt-out leaves malloc alone
    if control < 1000:
        pytest.skip(f"this kernel maps a 64 MiB block in {control} faults (huge pages): nothing to save")
    kept, faults = _faults(opt_out=False)
    assert kept == "True" and faults * 10 < control  # ~16,000 faults (4 KiB pages) each time without, 0 once the heap holds it
