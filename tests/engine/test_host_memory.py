"""engine/host_memory.py: the environment a CPU worker process starts with, and what it does
to that process's memory on this kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptoss_ray.config import HUGE_PAGES_TUNABLE, worker_env


def test_cpu_workers_ask_for_huge_pages_and_keep_the_operators_tunables():
    assert worker_env("cuda", {}) == {}
    assert worker_env("cpu", {}) == {"GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    assert worker_env("cpu", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"}
    # an explicit choice of the same tunable (0 turns it off) is left as the operator set it
    assert worker_env("cpu", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}


_CHILD = """
import torch
from gptoss_ray.engine.host_memory import huge_pages_requested
w = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, as a weight would be allocated
print(huge_pages_requested(), next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")))
"""


def _child(env: dict[str, str]) -> tuple[bool, int]:
    base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=base | env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="this kernel offers no transparent huge pages")
def test_a_process_started_with_worker_env_gets_huge_pages_for_its_tensors():
    requested, huge_kb = _child(worker_env("cpu", {}))
    assert requested and huge_kb >= 32 << 10  # most of the 64 MiB tensor sits on 2 MiB pages
    plain_requested, plain_kb = _child({})
    assert not plain_requested
    if "[madvise]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
        assert plain_kb < huge_kb  # without the tunable, madvise mode gives the tensor none
