"""Keep freed memory in the process on CPU: a training step should not page-fault its tensors in anew.

glibc's ``malloc`` serves large blocks (above a threshold that adapts up to 32 MiB) with ``mmap``
and returns them with ``munmap`` when freed, and trims the heap's top past 128 KiB. A PyTorch
training step on the CPU frees and reallocates its activations, gradients and logits every step,
so each step the kernel maps and zeroes them again: on SmolLM2-135M at 4 x 256 tokens, 200,000-460,000
minor page faults and 1.5-3.3 s of system time per 10-12 s step, varying from step to step
(docs/journal/benchmarks.md). Setting ``M_MMAP_MAX`` to 0 and ``M_TRIM_THRESHOLD`` to 2 GiB, mallopt's largest
(what the environment variables ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` do at start-up), keeps freed
blocks for reuse: after the first steps a step faults next to nothing (0-333 times, measured). Dense and SAT runs gain alike; the
cost is that the process keeps its peak heap until it exits, which a training process reaches
anyway. jemalloc or tcmalloc through ``LD_PRELOAD`` do the same job and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger("sat_trainer")

OPT_OUT = "SAT_TRAINER_KEEP_CPU_MEMORY"  # set to 0 to leave malloc as it is
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory (see the module docstring); True if it did. Does
    nothing off Linux/glibc, under an ``LD_PRELOAD``-ed allocator, or with ``SAT_TRAINER_KEEP_CPU_MEMORY=0``."""
    if os.environ.get(OPT_OUT, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ.get("LD_PRELOAD", "") for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if done:
        logger.info("sat_trainer: malloc keeps freed memory (no page faults per step on CPU; %s=0 turns this off)", OPT_OUT)
    return done
