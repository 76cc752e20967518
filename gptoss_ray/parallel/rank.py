"""One rank of an expert-parallel group: the body of each Ray worker actor.

Kept free of Ray imports so the same class runs as an actor (worker_group.py wraps it
with `ray.remote`) and could run in any other process launcher.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptoss_ray.parallel.dispatch import DispatchStats, ExpertParallelDispatcher, install_dispatcher
from gptoss_ray.parallel.group import ProcessGroupHandle, RendezvousInfo
from gptoss_ray.parallel.placement import ExpertPlacement

logger = logging.getLogger(__name__)


@dataclass
class RankStepOutput:
    """What one rank returns per step: the engine's StepResult plus the step's costs."""

    result: object  # the engine Worker's StepResult for this rank's sequences
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
    """Holds the engine Worker of one rank, built with only this rank's experts."""

    def __init__(self, rank: int, world_size: int, device: str, experts: range,
                 worker_factory: Callable):
        if device == "cpu":
            # N ranks share the host's cores; intra-op threads would only fight each other.
            torch.set_num_threads(1)
        self.rank, self.world_size, self.device = rank, world_size, device
        self.experts = experts
        self.worker_factory = worker_factory
        self.group = ProcessGroupHandle()
        self.worker = None
        self.stats = DispatchStats()
        self.num_moe_layers = 0
        self._dispatcher: ExpertParallelDispatcher | None = None

    def start_rendezvous(self) -> RendezvousInfo:
        return self.group.start_rendezvous(self.world_size)

    def setup(self, info: RendezvousInfo) -> int:
        """Join the process group, build the Worker, install the dispatcher; return the pid."""
        device = "cuda:0" if self.device == "cuda" else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES
        self.group.join(info, self.rank, device)
        self.worker = self.worker_factory(self.rank, self.experts)
        model = getattr(self.worker, "model", None)
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
        if self._dispatcher is not None and self.stats.layers < self.num_moe_layers:
            self._take_part_idle()
        return RankStepOutput(
            result=result, all_to_all_s=self.stats.all_to_all_s, wire_bytes=self.stats.wire_bytes,
            pair_wire_bytes=self.stats.pair_wire_bytes, worker_s=time.perf_counter() - t0,
        )

    def _take_part_idle(self) -> None:
        """A Worker that skipped its forward (no tokens on this rank) still owes the other
        ranks one dispatch per MoE layer: serve them with zero tokens of our own."""
        if self.stats.layers != 0:
            raise RuntimeError(f"rank {self.rank} ran {self.stats.layers} of {self.num_moe_layers} MoE layers")
        model = self.worker.model
        hidden, top_k = model.config.hidden_size, model.config.num_experts_per_tok
        dev = next(model.parameters()).device
        x = torch.empty(0, hidden, dtype=model.dtype, device=dev)
        ids = torch.empty(0, top_k, dtype=torch.int64, device=dev)
        weights = torch.empty(0, top_k, dtype=model.dtype, device=dev)
        with torch.inference_mode():
            for moe in model.moe_layers():
                self._dispatcher(x, ids, weights, moe.experts)

    # --- queries (plain remote calls, not per step) -------------------------------------

    def weight_bytes(self) -> dict[str, int]:
        return weight_bytes(self.worker.model)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self.group.close()
