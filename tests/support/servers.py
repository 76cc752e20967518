"""A server in a subprocess for tests: start it, wait for /health, stop it, whatever
the server (ours through `gptoss-ray serve`, or the transformers peer)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


@contextlib.contextmanager
def server_process(cmd: list[str], port: int, log: Path, env: dict, ready_timeout_s: float = 180) -> Iterator[str]:
    """Run `cmd` (in its own session, output to `log`: a pipe nobody reads would block it),
    yield its base URL once /health answers 200, then SIGTERM it (SIGKILL after 60 s)."""
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            assert proc.poll() is None, f"server exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready in {ready_timeout_s} s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
