"""How the engine reaches its workers: one StepPlan in, one StepResult per rank out.

`InProcessExecutor` holds a single Worker in the engine's process (ep_size=1, the default
and what the tests use). `RayExecutor` (ray_executor.py) implements the same interface
over N expert-parallel Ray actors; `create_executor` (engine.py) picks one.
"""

from __future__ import annotations

import abc

from gptoss_ray.engine.plan import StepPlan, StepResult
from gptoss_ray.engine.worker import Worker, WorkerConfig
from gptoss_ray.engine_api import ExpertParallelStats


class Executor(abc.ABC):
    @abc.abstractmethod
    def execute(self, plan: StepPlan) -> list[StepResult]:
        """Run one step on every rank; results indexed by rank."""

    @abc.abstractmethod
    def check_health(self) -> None:
        """Raise if a worker is dead or unresponsive."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Release the workers (idempotent)."""

    def stats(self) -> ExpertParallelStats | None:
        """The expert all-to-all's cost; None where there is none (one rank)."""
        return None


class InProcessExecutor(Executor):
    def __init__(self, worker_config: WorkerConfig, worker_cls: type[Worker] = Worker):
        self.worker = worker_cls(worker_config, rank=0)

    def execute(self, plan: StepPlan) -> list[StepResult]:
        return [self.worker.execute(plan)]

    def check_health(self) -> None:
        self.worker.check_health()

    def shutdown(self) -> None:
        self.worker = None
