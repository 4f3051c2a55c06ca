"""The process's C allocator, tuned for model inference (one policy, used by every worker).

glibc's malloc serves allocations above its mmap threshold (128 KiB, rising dynamically to
at most 32 MiB) with fresh ``mmap`` pages, and returns them on ``free``. A model's feature
maps are far larger (a 1024² image ×2 through the builtin decoder holds 128 MiB maps), so
every forward call faulted in, and the kernel zeroed, hundreds of MiB again: measured, 1.03 s
of a 2.80 s forward in the kernel (``benchmarks/bench_tiling.py``). ``tune_allocator`` raises
the mmap and trim thresholds (``mallopt``) to ``THRESHOLD_BYTES``, so freed maps stay in the
heap and the next batch reuses them. The cost: a worker keeps its peak heap (its largest
batch's activations) instead of returning it between batches.

A no-op where the C library is not glibc (musl, macOS), or with ``PIXELRELAY_ALLOCATOR=default``.
Must run in the process that does the work (a prefork child inherits the setting).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("pixelrelay.memory")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1 << 30


def tune_allocator(threshold: int = THRESHOLD_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds; whether it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(mallopt(M_TRIM_THRESHOLD, threshold))
    log.debug("allocator thresholds %s", "raised" if ok else "left as they were")
    return ok
