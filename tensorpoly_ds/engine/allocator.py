"""glibc malloc settings for the host memory of a training process.

PyTorch's CPU tensors and DeepSpeed's gathered ZeRO-3 parameters are large, short-lived allocations. glibc
serves an allocation above its mmap threshold with its own mapping (returned to the system on free), but
raises that threshold each time such a block is freed, up to 32 MiB, after which tensors of a few MiB come
from the heap arenas, which fragment and are not trimmed: the process keeps the high-water mark of every
step (measured at T0-3B shapes, ZeRO-3 bf16 on 2 CPU ranks: past 9.6 GB per rank and killed as shipped
before; docs/benchmarks.md has the numbers with these settings). Fixing both thresholds stops the drift.

Applied in-process with mallopt, so every launcher (srun, torchrun, deepspeed, plain python) gets them.
A value set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_: glibc applies those at
start-up) is left as it is; TPDS_MALLOC_TUNING=0 leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)
# environment variable glibc reads -> (mallopt parameter, value in bytes)
SETTINGS: dict[str, tuple[int, int]] = {
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 1 << 20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 1 << 20),
}
DISABLE = "TPDS_MALLOC_TUNING"


def configure_malloc(environ=None) -> dict[str, int]:
    """Apply SETTINGS to this process (glibc on Linux only). Returns {variable: bytes} for what it applied."""
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return {}
    libc = ctypes.CDLL("libc.so.6")
    applied = {}
    for name, (param, value) in SETTINGS.items():
        if name not in environ and libc.mallopt(param, value) == 1:
            applied[name] = value
    return applied
