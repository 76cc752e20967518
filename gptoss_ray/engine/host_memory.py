"""How a CPU worker process's memory is set up for its decode steps (Linux, glibc).

**Freed blocks stay in the heap** (`keep_large_allocations`, at worker start). glibc's
malloc serves each allocation above its mmap threshold (128 KiB, raised on the fly to at
most 32 MiB) with a fresh mmap and unmaps it on free, and it trims the heap top back to the
OS past 128 KiB free. A CPU decode step allocates and frees tens of MB every step (16 rows
of 201k-vocab logits are 6 MB in bf16 and 13 MB in float32), so every step the kernel
zeroes and faults in those pages again: ~50,000 minor page faults per 64-step run of the
shared CPU workload, ~4 with this. vLLM's CPU guide gets the same by preloading tcmalloc;
mallopt needs no extra library. The cost is resident memory: freed blocks stay with the
process for its next step instead of going back to the OS.

**Its memory on 2 MiB pages** (`config.worker_env`, in the environment the process starts
with: the serve layer sets it too, and may not import the engine).
A CPU decode step streams every weight from DRAM (the 201k-row unembedding alone is 103 MB
in bf16), and its ~200 small ops then run on caches and TLB that stream flushed. Where
transparent huge pages are in `madvise` mode (the common default: the kernel gives them only
to memory that asks), glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for all of
the process's heap. Measured here (benchmarks/RESULTS.md, "huge pages"): the shared bf16
workload 0-6% faster over six alternating pairs (~3%), and the greedy sampler over 256 x 201k
float32 logits 26 -> 21 ms a step; asking only for the weights' ranges after loading
(madvise + MADV_COLLAPSE) gained nothing measurable, so it is the whole heap or nothing.
glibc reads tunables once, at process start, so this is an environment variable for the
worker processes gptoss-ray starts (the Serve replica that hosts an ep_size 1 engine, the
expert-parallel rank actors); an in-process `LLM` gets it only when its own process
started with it, and the worker logs which.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from gptoss_ray.config import HUGE_PAGES_TUNABLE

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


def huge_pages_requested() -> bool:
    """Whether this process started with the huge-page tunable (config.worker_env)."""
    return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")
