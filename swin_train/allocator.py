"""Keep freed CPU memory in the process between steps, so that large activations do not page-fault.

Why our own setting: torch allocates CPU tensors with the C library's malloc. glibc serves every request
above its mmap threshold (at most 32 MiB by default) with a fresh mmap and returns it with munmap on free,
so each of Swin-T's large activations (a batch-8 stage-1 MLP hidden map is 38.5 MB) is faulted in page by
page at every step. Raising the threshold and the trim limit keeps that memory in the heap for the next
step (`python scripts/benchmark.py --system-malloc` measures page faults and img/s without it; the README
has the numbers). jemalloc or tcmalloc via LD_PRELOAD do the same job; this needs no install.

Set SWIN_TRAIN_SYSTEM_MALLOC=1 to keep the C library's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {
    M_MMAP_THRESHOLD: 1 << 30,  # requests up to 1 GiB come from the heap, not a fresh mmap
    M_TRIM_THRESHOLD: (1 << 31) - 1,  # never give freed heap memory back to the OS between steps
    M_TOP_PAD: 64 << 20,  # grow the heap 64 MiB at a time
}
# glibc raises its mmap threshold by itself, up to this (64-bit), once a block that large is freed: smaller
# activations already come back from the heap, and SETTINGS would only hold more memory for them.
DYNAMIC_MMAP_THRESHOLD_MAX = 32 << 20
_applied = False


def keep_freed_memory(largest_block: int | None = None) -> bool:
    """Apply SETTINGS to glibc's malloc (once per process); False where not glibc, opted out, or where
    `largest_block` (bytes, the largest activation) is small enough for glibc's own threshold."""
    global _applied
    if _applied:
        return True
    if os.environ.get("SWIN_TRAIN_SYSTEM_MALLOC") == "1" or platform.libc_ver()[0] != "glibc":
        return False
    if largest_block is not None and largest_block <= DYNAMIC_MMAP_THRESHOLD_MAX:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    accepted = [mallopt(param, value) == 1 for param, value in SETTINGS.items()]
    _applied = all(accepted)
    if not _applied:
        log.debug("glibc refused %d of the %d malloc settings", accepted.count(False), len(accepted))
    return _applied
