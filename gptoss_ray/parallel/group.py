"""torch.distributed process groups across Ray actors, with ports found at run time.

Rendezvous without fixed ports: rank 0 starts the TCPStore on port 0, so the kernel
hands it a free port that is already bound (no window in which another process could
take it, unlike "bind 0, close, reuse the number"). Rank 0 reports (node ip, port) to
the driver, the driver passes it to every other rank, and all ranks then join the group
through that store. Backend: NCCL when the ranks hold CUDA devices, gloo otherwise.

These functions run inside the worker processes; `worker_group.py` drives them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RendezvousInfo:
    """Where the ranks meet; produced by rank 0, handed to the others by the driver."""

    host: str  # rank 0's node IP address (reachable from every node of the cluster)
    port: int  # TCPStore port chosen by the kernel on rank 0's node
    world_size: int  # N: ranks in the group


def node_ip_address() -> str:
    """This node's IP as Ray knows it (the address other nodes reach it on)."""
    import ray

    return ray.util.get_node_ip_address()


def default_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class ProcessGroupHandle:
    """One rank's membership of an expert-parallel process group.

    Holds the rendezvous store (rank 0's is the server and must outlive the group) and
    tears the group down on `close()`, so a rebuilt worker group starts clean."""

    def __init__(self) -> None:
        self.store: dist.TCPStore | None = None
        self.rank: int | None = None
        self.world_size: int | None = None
        self.backend: str | None = None

    def start_rendezvous(self, world_size: int, host: str | None = None) -> RendezvousInfo:
        """Rank 0 only: serve the store on a free port and say where it is."""
        host = host or node_ip_address()
        self.store = dist.TCPStore(
            host, 0, world_size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=120),
        )
        return RendezvousInfo(host=host, port=self.store.port, world_size=world_size)

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
        kwargs = {}
        if self.backend == "nccl":
            torch.cuda.set_device(torch.device(device))  # NCCL binds each rank to its current device
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(
            self.backend, store=self.store, rank=rank, world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s), **kwargs,
        )
        self.rank, self.world_size = rank, info.world_size
        logger.info("rank %d/%d joined %s group at %s:%d", rank, info.world_size,
                    self.backend, info.host, info.port)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = None
