"""What `gptoss-ray serve --host 127.0.0.1 --ep-size 2` listens on, as `ss -ltnp` would show
it (read from /proc): nothing the project opens (the HTTP API, the ranks' rendezvous store,
their gloo connections) on a non-loopback address. Ray's own ports are Ray's (see the
README's security section): its daemons, Serve's replica ports, and one core-worker gRPC
port in every Ray worker process (the ranks included)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import pytest
from support.net import descendants, is_loopback, listening
from support.servers import server_process

from gptoss_ray.serve.testing import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_serve_with_two_ranks_opens_nothing_beyond_loopback(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "gptoss_ray.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--ep-size", "2", "--num-cpus", "4", "--worker-num-cpus", "0.1", "--device", "cpu",
           "--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "64"]
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_RAY_API_KEY"}
    with server_process(cmd, port, tmp_path / "serve.log", env, ready_timeout_s=300) as url:
        # a request, so both ranks have joined their group and run a step
        r = httpx.post(url + "/v1/completions", json={"model": "gpt-oss-tiny-demo", "prompt": [1, 2, 3],
                                                      "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text
        root = _server_pid(port)
        pids = descendants(root)
        sockets = listening(pids)
        names = {pid: _cmdline(pid) for pid in pids}
    http = [(addr, p) for _, addr, p in sockets if p == port]
    assert http == [("127.0.0.1", port)], sockets  # the API: loopback only (no SO_REUSEPORT twin on [::])
    ranks = [pid for pid in pids if "RankActor" in names[pid]]
    assert len(ranks) == 2, names
    rank_sockets = [s for s in sockets if s[0] in ranks]
    assert any(is_loopback(a) for _, a, _ in rank_sockets), rank_sockets  # rank 0's store is there
    # the rank processes, where the project opens sockets of its own (rendezvous store,
    # gloo): beyond loopback only Ray's core-worker gRPC port, which every Ray worker has
    for pid in ranks:
        outside = [(a, p) for q, a, p in sockets if q == pid and not is_loopback(a)]
        assert len(outside) <= 1, (names[pid][:80], outside)


def _server_pid(port: int) -> int:
    """The `gptoss-ray serve` process listening... found by its command line."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and f"--port {port} " in _cmdline(int(entry)) + " " and "gptoss_ray.cli" in _cmdline(int(entry)):
            return int(entry)
    raise AssertionError("serve process not found")
