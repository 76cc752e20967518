"""The step benchmarks run against the engine as it is: engine_overhead.py's fixed-logits model
stands in for the real one through the worker's model interface, and step_breakdown.py wraps
the worker's calls by name; either can drift from the code they time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "engine_overhead.py"


@pytest.mark.parametrize("sampling", ["greedy", "top_p"])
def test_engine_overhead_benchmark_runs(sampling):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--num-seqs", "8", "--steps", "5", "--vocab", "256",
                           "--sampling", sampling], capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "schedule" in proc.stdout, proc.stdout


def test_step_breakdown_benchmark_runs():
    proc = subprocess.run([sys.executable, str(BENCH / "step_breakdown.py"), "--num-prompts", "2", "--prompt-len", "8",
                           "--output-len", "4", "--runs", "1", "--threads", "1"], capture_output=True, text=True,
                          timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = dict(line.split(None, 1) for line in proc.stdout.splitlines()[1:])
    assert {"model", "attn", "moe", "sampler"} <= set(parts), proc.stdout
    assert all(float(v.split()[0]) > 0 for k, v in parts.items() if k in ("model", "sampler")), proc.stdout
