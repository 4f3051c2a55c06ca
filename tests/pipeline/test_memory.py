"""``pipeline.memory``: with the allocator tuned, a freed feature map stays in the heap for the
next batch instead of going back to the kernel (to be faulted in and zeroed again)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# glibc's mallinfo2: (arena, ordblks, smblks, hblks, hblkhd, usmblks, fsmblks, uordblks,
# fordblks, keepcost), size_t each. fordblks: free bytes kept in the heap.
PROBE = """
import ctypes, sys
import numpy as np
from pixelrelay.pipeline.memory import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"
    )]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert tune_allocator()
a = np.ones(16 << 20)  # a 128 MiB feature map
during = libc.mallinfo2()
del a
after = libc.mallinfo2()
print(during.hblkhd, after.fordblks)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    mmapped, kept = out.stdout.split()
    return int(mmapped), int(kept)


@pytest.mark.slow
def test_a_freed_feature_map_stays_in_the_heap_only_when_tuned():
    mmapped, kept = _probe("default")
    assert mmapped >= 128 << 20 and kept < 16 << 20  # its own mapping, returned on free
    mmapped, kept = _probe("tuned")
    assert mmapped < 16 << 20 and kept >= 128 << 20  # from the heap, and kept there
