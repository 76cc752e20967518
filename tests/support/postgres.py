"""A throwaway PostgreSQL server for tests: initdb in a temp dir, a free 127.0.0.1 port,
trust auth, stopped (and its files removed) afterwards.

The binaries come from Debian's `postgresql` package (scripts/setup.sh installs it where
apt is available): on PATH, or under /usr/lib/postgresql/*/bin. PostgreSQL refuses to
run as root, so as root the cluster runs as the `postgres` user (or `nobody`) via runuser.
`postgres_or_skip()` is the only place a test may skip: when no server can be had here.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptoss_ray.serve.testing import free_port


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name), reverse=True)
    return next((Path(d) for d in dirs if (Path(d) / "pg_ctl").exists()), None)


def _run_as() -> list[str]:
    if os.geteuid() != 0:
        return []
    for user in ("postgres", "nobody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            continue
        return ["runuser", "-u", user, "--"]
    raise RuntimeError("running as root and no unprivileged user for PostgreSQL")


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a `postgresql://` URL of a fresh, empty database."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL binaries (pg_ctl, initdb) not found")
    prefix = _run_as()
    root = Path(tempfile.mkdtemp(prefix="gptoss-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    if prefix:
        user = prefix[2]
        entry = pwd.getpwnam(user)
        for path in (root, sock):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    port = free_port()
    log = root / "server.log"
    try:
        subprocess.run(prefix + [str(bin_dir / "initdb"), "-D", str(data), "-U", "gptoss", "-A", "trust",
                                 "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                                 f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, timeout=120)
        yield f"postgresql://gptoss@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(prefix + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_or_skip() -> Iterator[str]:
    """postgres_server(), or skip the test where PostgreSQL is not installed."""
    if _bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup.sh installs it where apt is available)")
    with postgres_server() as url:
        yield url
