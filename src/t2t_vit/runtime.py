"""Process-wide CPU settings that the ``t2t-vit`` command applies before it starts work.

glibc's malloc gives each large tensor its own ``mmap`` (or trims the heap once it is freed), so the
next forward pass asks the kernel for the same memory again and page-faults every 4 KB of it.
Keeping freed memory in the heap for reuse removes those faults; that is what jemalloc or tcmalloc
would do, without a new dependency. The price is that the process's resident memory no longer
shrinks after a peak, which suits a training or inference process. docs/benchmarks.md gives the
measured effect and its command.

Library users can call :func:`keep_freed_memory` themselves; ``T2T_VIT_MALLOC_TUNING=0`` turns it
off for the command.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more on 64-bit systems
_applied = False


def keep_freed_memory(trim_threshold: int = 2**30) -> bool:
    """Let glibc reuse freed tensors' memory instead of returning it to the kernel.

    Allocations below 32 MB come from the heap, and up to ``trim_threshold`` bytes of free memory
    at its top are kept. Returns True when the settings took effect, False where there is no glibc
    (macOS, Windows, musl) or it refused them.
    """
    global _applied
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (and mallopt with these numbers)
    except (OSError, AttributeError):
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(trim_threshold, 2**31 - 1)))
    )
    _applied = _applied or applied
    return applied


def tune_for_command() -> bool:
    """What ``t2t-vit`` applies at start-up, unless ``T2T_VIT_MALLOC_TUNING=0``."""
    if os.environ.get("T2T_VIT_MALLOC_TUNING", "1") == "0":
        return False
    return keep_freed_memory()


def malloc_tuned() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _applied


def default_device() -> str:
    """The device commands use when none is given: the first GPU if there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
