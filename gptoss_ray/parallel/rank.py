"""One rank of an expert-parallel group: the body of each Ray worker actor.

Kept free of Ray imports so the same class runs as an actor (worker_group.py wraps it
with `ray.remote`) and could run in any other process launcher. It knows nothing of the
engine: it holds whatever `RankWorker` the factory builds (the engine's Worker, or a
benchmark's stand-in), joins the process group and points the worker's MoE layers at
the all-to-all dispatcher. The worker runs its model every step, with zero tokens when
none are on this rank, so every rank meets the others at each layer's all-to-all.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from gptoss_ray.parallel.dispatch import DispatchStats, ExpertParallelDispatcher, install_dispatcher
from gptoss_ray.parallel.group import LOOPBACK, ProcessGroupHandle, RendezvousInfo
from gptoss_ray.parallel.placement import ExpertPlacement

logger = logging.getLogger(__name__)


PlanT = TypeVar("PlanT", contravariant=True)
ResultT = TypeVar("ResultT")
ResultT_co = TypeVar("ResultT_co", covariant=True)


class RankWorker(Protocol[PlanT, ResultT_co]):
    """What a rank runs: one `execute(plan)` per step. `model` (a GptOssModel, or None for a
    worker without one) gets the dispatcher; it must run every step, tokens or not."""

    model: torch.nn.Module | None

    def execute(self, plan: PlanT) -> ResultT_co: ...


# Runs inside the actor: (rank, experts it owns) -> the worker.
WorkerFactory = Callable[[int, range], RankWorker]


@dataclass
class RankStepOutput(Generic[ResultT]):
    """What one rank returns per step: its worker's result plus the step's costs."""

    result: ResultT  # the worker's result for this rank's sequences (the engine's StepResult)
    all_to_all_s: float  # seconds this rank spent inside MoE collectives
    wire_bytes: int  # bytes this rank sent to other ranks
    pair_wire_bytes: int  # what a per-pair dispatch would have sent (see DispatchStats)
    worker_s: float  # seconds inside Worker.execute (model + sampling + bookkeeping)


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Resident bytes of a model's weights: its experts, and everything else ("shared",
    which every rank holds whole). Derived buffers (RoPE tables, load counters) excluded."""
    expert, shared = 0, 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        nbytes = t.numel() * t.element_size()
        if ".experts." in name:
            expert += nbytes
        elif "expert_counts" not in name and "inv_freq" not in name:
            shared += nbytes
    return {"expert": expert, "shared": shared}


class RankActor:
    """Holds the worker of one rank, built with only this rank's experts."""

    def __init__(self, rank: int, world_size: int, device: str, experts: range,
                 worker_factory: WorkerFactory):
        if device == "cpu":
            # N ranks share the host's cores; intra-op threads would only fight each other.
            torch.set_num_threads(1)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.experts = experts
        self.worker_factory = worker_factory
        self.group = ProcessGroupHandle()
        self.worker: RankWorker | None = None
        self.stats = DispatchStats()
        self.num_moe_layers = 0
        self._dispatcher: ExpertParallelDispatcher | None = None

    def start_rendezvous(self, host: str = LOOPBACK) -> RendezvousInfo:
        return self.group.start_rendezvous(self.world_size, host)

    def setup(self, info: RendezvousInfo) -> int:
        """Join the process group, build the Worker, install the dispatcher; return the pid."""
        device = "cuda:0" if self.device == "cuda" else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        self.group.join(info, self.rank, device)
        self.worker = self.worker_factory(self.rank, self.experts)
        model = self.worker.model
        if model is not None and self.world_size > 1:
            num_experts = model.config.num_local_experts
            placement = ExpertPlacement(num_experts, self.world_size)
            if placement.range(self.rank) != self.experts:
                raise RuntimeError(f"rank {self.rank} built experts {self.experts}, placement says "
                                   f"{placement.range(self.rank)}")
            self._dispatcher = install_dispatcher(model, placement, self.rank)
            self.stats = self._dispatcher.stats
            self.num_moe_layers = len(model.moe_layers())
        return os.getpid()

    def step(self, plan) -> RankStepOutput:
        self.stats.reset()
        t0 = time.perf_counter()
        result = self.worker.execute(plan)
        if self._dispatcher is not None and self.stats.layers != self.num_moe_layers:
            # A rank that skipped a layer's all-to-all leaves the others waiting in it.
            raise RuntimeError(f"rank {self.rank} ran {self.stats.layers} of {self.num_moe_layers} MoE layers")
        return RankStepOutput(
            result=result, all_to_all_s=self.stats.all_to_all_s, wire_bytes=self.stats.wire_bytes,
            pair_wire_bytes=self.stats.pair_wire_bytes, worker_s=time.perf_counter() - t0,
        )

    # --- queries (plain remote calls, not per step) -------------------------------------

    def weight_bytes(self) -> dict[str, int]:
        return weight_bytes(self.worker.model)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.group.close()
