"""How the engine reaches its workers: one StepPlan in, one StepResult per rank out.

`InProcessExecutor` holds a single Worker in the engine's process (ep_size=1, the default
and what the tests use). The expert-parallel executor (gptoss_ray.parallel) implements the
same interface over N Ray actors.
"""

from __future__ import annotations

import abc
import importlib
import logging

from gptoss_ray.engine.plan import StepPlan, StepResult
from gptoss_ray.engine.worker import Worker, WorkerConfig

logger = logging.getLogger(__name__)

# ep_size > 1: "module:Class" of the expert-parallel executor, constructed as
# cls(worker_config, engine_config) (written in gptoss_ray/parallel/).
EP_EXECUTOR = "gptoss_ray.parallel.executor:RayExecutor"


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


class InProcessExecutor(Executor):
    def __init__(self, worker_config: WorkerConfig, worker_cls: type[Worker] = Worker):
        self.worker = worker_cls(worker_config, rank=0)

    def execute(self, plan: StepPlan) -> list[StepResult]:
        return [self.worker.execute(plan)]

    def check_health(self) -> None:
        self.worker.check_health()

    def shutdown(self) -> None:
        self.worker = None


def create_executor(worker_config: WorkerConfig, engine_config) -> Executor:
    if worker_config.ep_size == 1:
        return InProcessExecutor(worker_config)
    module_name, cls_name = EP_EXECUTOR.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    logger.info("expert parallelism over %d ranks with %s", worker_config.ep_size, EP_EXECUTOR)
    return cls(worker_config, engine_config)
