"""RayExecutor: the engine's Executor over N expert-parallel Ray worker actors.

The engine picks it when `ep_size > 1` (engine.py: `create_executor`). Each rank's
worker is the engine's own Worker, loading only its experts; gptoss_ray.parallel's
WorkerGroup holds the actors, the process group and the compiled step graph, and knows
nothing of the engine beyond the factory handed to it here.

Errors: `execute()` raises `WorkerGroupError` when a worker dies, hangs past
`EngineConfig.step_timeout_s` or fails a step. By then the group is torn down and every
sequence on the workers (their KV caches, their sampler state) is gone: the engine must
end those requests with finish_reason "error" and forget the workers' state (block
tables, prefix cache). The next `execute()` builds a fresh group.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from gptoss_ray.config import EngineConfig, ModelConfig, worker_env
from gptoss_ray.engine.executor import Executor
from gptoss_ray.engine.plan import StepPlan, StepResult
from gptoss_ray.engine.worker import Worker, WorkerConfig
from gptoss_ray.engine_api import ExpertParallelStats
from gptoss_ray.errors import ConfigError
from gptoss_ray.parallel.worker_group import StepStats, WorkerGroup, WorkerGroupConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineWorkerFactory:
    """Builds a rank's Worker inside its actor (pickled to the actors, so plain values)."""

    config: WorkerConfig  # the engine's resolved worker settings, identical on every rank

    def __call__(self, rank: int, experts: range) -> Worker:
        return Worker(self.config, rank, experts)


class RayExecutor(Executor):
    def __init__(self, worker_config: WorkerConfig, engine_config: EngineConfig | None = None,
                 use_compiled_graph: bool = True):
        engine_config = engine_config or EngineConfig()
        model = ModelConfig.from_json_file(Path(worker_config.model_path) / "config.json")
        if worker_config.ep_size > model.num_local_experts:
            raise ConfigError(f"ep_size {worker_config.ep_size} exceeds the model's "
                              f"{model.num_local_experts} experts per layer")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:  # offline use (LLM(...)); under Serve, Ray is already up
            self._start_local_ray(worker_config, engine_config)
        self.group = WorkerGroup(
            WorkerGroupConfig(
                ep_size=worker_config.ep_size, num_experts=model.num_local_experts,
                device=worker_config.device, placement_strategy=engine_config.placement_strategy,
                worker_num_cpus=engine_config.worker_num_cpus, step_timeout_s=engine_config.step_timeout_s,
                use_compiled_graph=use_compiled_graph, rendezvous_host=engine_config.rendezvous_host,
                env_vars=tuple(worker_env(worker_config.device).items()),  # host_memory.py
            ),
            EngineWorkerFactory(worker_config),
        )
        self.group.start()
        self.num_steps = 0
        self.total = StepStats()  # sums over all steps since start

    @staticmethod
    def _start_local_ray(worker_config: WorkerConfig, engine_config: EngineConfig) -> None:
        num_cpus = None
        if worker_config.device == "cpu":
            # Logical CPUs enough for N workers and the driver, however few cores the host has.
            wanted = math.ceil(worker_config.ep_size * engine_config.worker_num_cpus) + 1
            num_cpus = max(os.cpu_count() or 1, wanted)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if worker_config.device == "cuda" and gpus < worker_config.ep_size:
            # A local cluster cannot grow: say so now rather than wait for placement.
            ray.shutdown()
            raise ConfigError(f"ep_size {worker_config.ep_size} needs {worker_config.ep_size} GPUs; "
                              f"this machine has {gpus}")

    def execute(self, plan: StepPlan) -> list[StepResult]:
        outputs = self.group.step(plan)  # raises WorkerGroupError after tearing down
        last = self.group.last_stats
        self.num_steps += 1
        self.total.all_to_all_s += last.all_to_all_s
        self.total.wire_bytes += last.wire_bytes
        self.total.pair_wire_bytes += last.pair_wire_bytes
        self.total.worker_s += last.worker_s
        self.total.step_s += last.step_s
        return [o.result for o in outputs]

    def check_health(self) -> None:
        """Replace a dead or hung group between steps; raise only if none can be started."""
        self.group.health_check()

    def stats(self) -> ExpertParallelStats:
        """All-to-all cost of the last step and averages since start (for engine.stats())."""
        last, n = self.group.last_stats, max(self.num_steps, 1)
        return ExpertParallelStats(
            ep_size=self.group.config.ep_size,
            expert_ranges=[(r.start, r.stop) for r in self.group.placement.ranges()],
            num_steps=self.num_steps,
            num_rebuilds=self.group.num_rebuilds,
            last_step_all_to_all_s=last.all_to_all_s,
            last_step_wire_bytes=last.wire_bytes,
            mean_all_to_all_s_per_step=self.total.all_to_all_s / n,
            mean_wire_bytes_per_step=self.total.wire_bytes / n,
            mean_pair_wire_bytes_per_step=self.total.pair_wire_bytes / n,
            mean_control_overhead_s_per_step=(self.total.step_s - self.total.worker_s) / n,
        )

    def reset_stats(self) -> None:
        """Start the per-step averages afresh (benchmarks: after a warm-up)."""
        self.num_steps, self.total = 0, StepStats()

    def weight_bytes(self) -> list[dict[str, int]]:
        """Per rank: resident bytes of its experts and of the shared (replicated) weights."""
        return self.group.call_all("weight_bytes")

    def worker_pids(self) -> list[int]:
        return list(self.group.pids)

    def shutdown(self) -> None:
        self.group.shutdown()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
