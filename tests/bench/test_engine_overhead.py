"""benchmarks/engine_overhead.py runs against the engine as it is (its fixed-logits model
stands in for the real one through the worker's model interface, which can drift)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "engine_overhead.py"


@pytest.mark.parametrize("sampling", ["greedy", "top_p"])
def test_engine_overhead_benchmark_runs(sampling):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--num-seqs", "8", "--steps", "5", "--vocab", "256",
                           "--sampling", sampling], capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "schedule" in proc.stdout, proc.stdout
