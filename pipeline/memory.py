"""The process's C allocator, tuned for model inference (one policy, used by every worker).

``tune_allocator`` raises glibc's mmap and trim thresholds to ``THRESHOLD_BYTES``, so freed
feature maps stay in the heap rather than being faulted in and zeroed again every forward
call (``benchmarks/bench_tiling.py``); a worker keeps its peak heap. A no-op off glibc or
with ``PIXELRELAY_ALLOCATOR=default``. Must run in the process that does the work.
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
