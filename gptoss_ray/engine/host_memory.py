"""Keep large freed blocks in the process heap on CPU workers (glibc only).

glibc's malloc serves each allocation above its mmap threshold (128 KiB, raised on the fly
to at most 32 MiB) with a fresh mmap and unmaps it on free, and it trims the heap top back
to the OS past 128 KiB free. A CPU decode step allocates and frees tens of MB every step
(16 rows of 201k-vocab logits are 6 MB in bf16 and 13 MB in float32), so every step the
kernel zeroes and faults in those pages again: ~50,000 minor page faults per 64-step run of
the shared CPU workload, ~4 with this. vLLM's CPU guide gets the same by preloading
tcmalloc; mallopt needs no extra library. The cost is resident memory: freed blocks stay
with the process for its next step instead of going back to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_KEEP = 1 << 30


def keep_large_allocations() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # older glibc refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2): then take that
    mmap = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP)) or bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    ok = mmap and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP))
    logger.debug("glibc mallopt: large allocations stay in the heap: %s", ok)
    return ok
