"""torch.distributed process groups across Ray actors, with ports found at run time.

Rendezvous without fixed ports: rank 0 binds a socket on port 0 of the rendezvous
address, so the kernel hands it a free port that is already bound (no window in which
another process could take it, unlike "bind 0, close, reuse the number"), and serves the
TCPStore on that socket. Rank 0 reports (address, port, secret) to the driver, the driver
passes it to every other rank, and all ranks then join the group through that store.
Backend: NCCL when the ranks hold CUDA devices, gloo otherwise.

Security: TCPStore has no authentication, and left to itself it listens on every
interface (`[::]`) whatever host it is given; anyone reaching the port can read and write
its keys. So the socket is bound here, to loopback by default (one model instance lives
on one machine), or to the address the user names for an instance spanning nodes; and
the group's keys live under a random per-group prefix (the secret, sent to the ranks
through Ray, never over the store), so a stranger connecting cannot guess them.

These functions run inside the worker processes; `worker_group.py` drives them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RendezvousInfo:
    """Where the ranks meet; produced by rank 0, handed to the others by the driver."""

    host: str  # the address rank 0's store listens on (loopback unless the instance spans nodes)
    port: int  # TCPStore port chosen by the kernel on rank 0's node
    world_size: int  # N: ranks in the group
    secret: str = ""  # prefix of every key of the group: unguessable by a stranger on the port


LOOPBACK = "127.0.0.1"
NODE_IP = "node"  # rendezvous_host value: rank 0's node IP as Ray knows it (multi-node instances)


def node_ip_address() -> str:
    """This node's IP as Ray knows it (the address other nodes reach it on)."""
    import ray

    return ray.util.get_node_ip_address()


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _keep_collectives_on_loopback() -> None:
    """gloo and NCCL open listeners of their own for the ranks' connections, on the address
    the host name resolves to; with a loopback rendezvous every rank is on this node, so
    put those on the loopback interface too (unless the user chose an interface)."""
    names = {name for _, name in socket.if_nameindex()}
    lo = next((n for n in ("lo", "lo0") if n in names), None)
    if lo is not None:
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, lo)


class ProcessGroupHandle:
    """One rank's membership of an expert-parallel process group.

    Holds the rendezvous store (rank 0's is the server and must outlive the group) and
    tears the group down on `close()`, so a rebuilt worker group starts clean."""

    def __init__(self) -> None:
        self.store: dist.TCPStore | None = None
        self.rank: int | None = None
        self.world_size: int | None = None
        self.backend: str | None = None

    def start_rendezvous(self, world_size: int, host: str = LOOPBACK) -> RendezvousInfo:
        """Rank 0 only: serve the store on a free port of `host` (loopback, an address of
        this node, or NODE_IP) and say where it is."""
        host = node_ip_address() if host == NODE_IP else host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((host, 0))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        # The store takes the bound socket over (detach: its fd is the store's to close).
        self.store = dist.TCPStore(
            host, port, world_size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=120), master_listen_fd=sock.detach(),
        )
        return RendezvousInfo(host=host, port=port, world_size=world_size, secret=secrets.token_hex(16))

    def join(self, info: RendezvousInfo, rank: int, device: torch.device | str,
             timeout_s: float = 120.0) -> None:
        """Join the group as `rank` (blocks until all N ranks have joined)."""
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        if rank != 0:
            self.store = dist.TCPStore(
                info.host, info.port, info.world_size, is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
        elif self.store is None:
            raise RuntimeError("rank 0 must call start_rendezvous() before join()")
        self.backend = default_backend(device)
        if ipaddress.ip_address(info.host).is_loopback:
            _keep_collectives_on_loopback()
        kwargs = {}
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(device))  # NCCL binds each rank to its current device
            kwargs["device_id"] = torch.device(device)
        store = dist.PrefixStore(f"{info.secret}/", self.store) if info.secret else self.store
        dist.init_process_group(
            self.backend, store=store, rank=rank, world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s), **kwargs,
        )
        self.rank, self.world_size = rank, info.world_size
        logger.info("rank %d/%d joined %s group at %s:%d", rank, info.world_size,
                    self.backend, info.host, info.port)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = None
