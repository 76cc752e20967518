"""N Ray actors forming one expert-parallel model instance, and the executor driving them.

Layout: a placement group of N bundles (PACK by default: NVLink-near GPUs; SPREAD on
request) holds one actor per rank. Each actor builds its worker (the engine's, through
the factory the engine passes in: this module imports nothing from the engine) with only its
experts (`placement.range(rank)`), joins a torch.distributed group (gloo on CPU, NCCL on
CUDA) and points every MoE layer at the all-to-all dispatcher.

Per step the driver sends the same StepPlan to every rank and gathers one StepResult
per rank. A plain `actor.method.remote()` per rank per step costs ~0.4 ms of task
submission and object-store traffic per call; Ray compiled graphs (`ray.dag` +
`experimental_compile`) instead set up shared-memory channels once and reuse them
every step, which is what keeps the per-step control overhead under a millisecond at
N = 4 (benchmarks/control_overhead.py measures both).

Failure model: any error or timeout of a step (a worker killed, hung, or raising)
leaves the other ranks stuck inside a collective, so the whole group is killed and the
step raises `WorkerGroupError` within `step_timeout_s`. Every sequence held by the
workers is lost with it; the engine fails those requests and the next `execute()`
starts a fresh group. The driver registers as the compiled graph's output reader at start,
so no teardown after a loss needs anything from a dead rank (see
`_register_as_output_reader`: without it, Ray could abort the driver).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gptoss_ray.parallel.errors import WorkerGroupError
from gptoss_ray.parallel.placement import ExpertPlacement
from gptoss_ray.parallel.rank import RankActor, RankStepOutput, WorkerFactory

logger = logging.getLogger(__name__)

# Generous: actors import torch and load their experts before they answer setup.
_START_TIMEOUT_S = 300.0
# The first steps after a (re)start may JIT-compile kernels; they get this much time.
_WARMUP_STEPS = 2
_WARMUP_TIMEOUT_S = 300.0
# Placement either fits the cluster soon or needs an autoscaler to add nodes.
_PLACEMENT_TIMEOUT_S = 120.0


def _describe(e: BaseException) -> str:
    """One line naming what went wrong on the worker, not Ray's wrapper of it."""
    cause = getattr(e, "cause", None) or e  # RayTaskError wraps the worker's exception
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else 'no message'}"[:300]


@dataclass(frozen=True)
class WorkerGroupConfig:
    """How to lay out one expert-parallel instance on the Ray cluster."""

    ep_size: int  # N: ranks (actors), one GPU each on CUDA
    num_experts: int  # E: experts per MoE layer, split over the ranks
    device: str = "cpu"  # "cpu" or "cuda"
    placement_strategy: str = "PACK"  # Ray placement group strategy for the N bundles
    worker_num_cpus: float = 1.0  # logical CPUs per actor (a fraction on small machines)
    step_timeout_s: float = 60.0  # a step not answered by then declares the group dead
    use_compiled_graph: bool = True  # False: one plain remote call per rank per step
    rendezvous_host: str = "127.0.0.1"  # where rank 0's TCPStore listens (see group.py); "node" = its node IP
    env_vars: tuple[tuple[str, str], ...] = ()  # set in each rank actor's process as it starts


@dataclass
class StepStats:
    """Cost of the last step, summed over ranks (all-to-all time: the slowest rank)."""

    all_to_all_s: float = 0.0  # max over ranks of the time spent in MoE collectives
    wire_bytes: int = 0  # bytes all ranks sent to other ranks
    pair_wire_bytes: int = 0  # per-pair dispatch reference: off-rank (token, expert) pairs x H x 2 x elem bytes
    worker_s: float = 0.0  # max over ranks of the time inside Worker.execute
    step_s: float = 0.0  # driver wall time of the step, control overhead included


class WorkerGroup:
    """The N rank actors, their process group and (optionally) a compiled step graph.

    `worker_factory(rank, experts: range)` runs inside each actor and returns a `RankWorker`
    (`execute(plan) -> result`, and `.model` for the dispatcher); `step(plan)` returns
    each rank's result wrapped in a RankStepOutput."""

    def __init__(self, config: WorkerGroupConfig, worker_factory: WorkerFactory):
        self.config = config
        self.placement = ExpertPlacement(config.num_experts, config.ep_size)
        self.worker_factory = worker_factory
        self.actors: list = []
        self.pids: list[int] = []
        self._pg = None
        self._owns_pg = False
        self._steps_since_start = 0
        self._dag = None
        self.rendezvous: tuple[str, int] | None = None
        # One thread steps (the engine loop), another may check health (Serve): starting,
        # stepping and tearing down never interleave.
        self._lock = threading.RLock()
        self.last_stats = StepStats()
        self.num_rebuilds = 0

    @property
    def is_running(self) -> bool:
        return bool(self.actors)

    def start(self) -> None:
        try:
            self._start()
        except Exception as e:  # noqa: BLE001 - a half-built group is as good as none
            self.shutdown(failed=True)
            raise WorkerGroupError(f"could not start the expert-parallel workers ({_describe(e)})") from e

    def _start(self) -> None:
        cfg = self.config
        bundles = self._reserve_bundles()
        actor_cls = ray.remote(RankActor)
        self.actors = [
            actor_cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
                runtime_env={"env_vars": dict(cfg.env_vars)} if cfg.env_vars else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=index),
            ).remote(r, cfg.ep_size, cfg.device, self.placement.range(r), self.worker_factory)
            for r, (index, bundle) in enumerate(bundles)
        ]
        info = ray.get(self.actors[0].start_rendezvous.remote(cfg.rendezvous_host), timeout=_START_TIMEOUT_S)
        self.rendezvous = (info.host, info.port)  # where rank 0's store listens (tests check it)
        self.pids = ray.get([a.setup.remote(info) for a in self.actors], timeout=_START_TIMEOUT_S)
        self._steps_since_start = 0
        if cfg.use_compiled_graph:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as plan:
                outputs = MultiOutputNode([a.step.bind(plan) for a in self.actors])
            # The submit timeout bounds writing a plan into the graph's channels, which blocks
            # while a stopped rank has not read the previous one: it must not exceed the step
            # timeout (it once was 300 s, and a SIGSTOPped worker stalled every request that
            # long). Slow warm-up steps are covered by ray.get's timeout below, not by this.
            self._dag = outputs.experimental_compile(_submit_timeout=cfg.step_timeout_s)
            self._register_as_output_reader()
        logger.info("expert-parallel group up: %d ranks, experts %s, compiled graph %s",
                    cfg.ep_size, self.placement.counts(), cfg.use_compiled_graph)

    def _register_as_output_reader(self) -> None:
        """Make the driver a reader of every rank's output channel now, while every rank lives.

        Each output channel is a shared-memory object owned by the rank that writes it, and
        Ray registers the driver as its reader lazily: on the first read, or else inside the
        graph's teardown (`Channel.close()`). A rank that dies before the driver's first read
        (a worker lost while idle, then `health_check` rebuilds) takes its channel's object
        with it; teardown then registers against a freed object and Ray aborts the whole
        process (`RAY_CHECK` in MutableObjectProvider::RegisterReaderChannel: `Invalid:
        Experimental mutable object must be in the local object store`). Registered here,
        the driver pins those objects, so tearing down after any loss only closes them.
        Ray offers no public hook for this; a Ray without it gets plain calls instead."""
        channels = getattr(self._dag, "dag_output_channels", None)
        if not channels or not all(hasattr(c, "ensure_registered_as_reader") for c in channels):
            logger.warning("this Ray's compiled graph has no output channels to register; "
                           "using one plain remote call per rank per step instead")
            self._dag.teardown()
            self._dag = None
            return
        for channel in channels:
            channel.ensure_registered_as_reader()  # idempotent: the first read skips it

    def _reserve_bundles(self) -> list[tuple[int, dict]]:
        """(bundle index, resources) for each rank.

        Inside a placement group with at least N+1 bundles (a Serve replica deployed with
        `placement_group_bundles=[replica] + [worker] * N`), the workers take bundles 1..N of
        it, so the resources Serve reserved (and autoscales on) are the ones used. Otherwise
        the group makes its own placement group of N bundles."""
        cfg = self.config
        current = ray.util.get_current_placement_group()
        if current is not None and current.bundle_count >= cfg.ep_size + 1:
            self._pg, self._owns_pg = current, False
            return [(i, current.bundle_specs[i]) for i in range(1, cfg.ep_size + 1)]
        gpus = 1 if cfg.device == "cuda" else 0
        # An empty bundle is not allowed; a sliver of CPU keeps "0 CPUs" schedulable.
        bundle = {"CPU": max(cfg.worker_num_cpus, 0.001)} | ({"GPU": gpus} if gpus else {})
        self._pg = placement_group([bundle] * cfg.ep_size, strategy=cfg.placement_strategy)
        self._owns_pg = True
        try:
            ray.get(self._pg.ready(), timeout=_PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"the cluster cannot place {cfg.ep_size} workers of {bundle} ({cfg.placement_strategy}); "
                f"available: {ray.available_resources()}"
            ) from None
        return [(r, bundle) for r in range(cfg.ep_size)]

    def step(self, plan) -> list[RankStepOutput]:
        """Run one step on every rank; raise WorkerGroupError (after tearing down) on failure."""
        with self._lock:
            if not self.is_running:
                self.num_rebuilds += 1
                self.start()
            return self._step(plan)

    def _step_timeout(self) -> float:
        # The first steps of a fresh group compile kernels (Triton JIT on GPUs): give them
        # time rather than declare a healthy group dead and rebuild it in a loop.
        if self._steps_since_start < _WARMUP_STEPS:
            return max(self.config.step_timeout_s, _WARMUP_TIMEOUT_S)
        return self.config.step_timeout_s

    def _step(self, plan) -> list[RankStepOutput]:
        timeout = self._step_timeout()
        self._steps_since_start += 1
        t0 = time.perf_counter()
        try:
            if self._dag is not None:
                outputs = ray.get(self._dag.execute(plan), timeout=timeout)
            else:
                refs = [a.step.remote(plan) for a in self.actors]
                outputs = ray.get(refs, timeout=timeout)
        except Exception as e:  # noqa: BLE001 - any failure leaves ranks stuck in a collective
            self.shutdown(failed=True)
            raise WorkerGroupError(
                f"expert-parallel step {getattr(plan, 'step_id', '?')} failed ({_describe(e)}); "
                "the worker group was torn down and will be rebuilt"
            ) from e
        self.last_stats = StepStats(
            all_to_all_s=max(o.all_to_all_s for o in outputs),
            wire_bytes=sum(o.wire_bytes for o in outputs),
            pair_wire_bytes=sum(o.pair_wire_bytes for o in outputs),
            worker_s=max(o.worker_s for o in outputs),
            step_s=time.perf_counter() - t0,
        )
        return outputs

    def health_check(self) -> None:
        """Ping the ranks between steps; replace a group that does not answer.

        Raises WorkerGroupError only when no working group can be had. A step in flight
        is its own health check (it has a timeout), so this does not wait for it. Pinging
        while idle matters: a worker dying between requests would otherwise fail the
        next request instead of being replaced before it."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            if self.is_running:
                try:
                    self.call_all("pid")
                    return
                except Exception as e:  # noqa: BLE001 - dead, hung or unreachable
                    logger.error("expert-parallel worker unhealthy (%s); rebuilding the group", _describe(e))
                    self.shutdown(failed=True)
            self.num_rebuilds += 1
            self.start()
        finally:
            self._lock.release()

    def call_all(self, method: str, *args, timeout: float | None = None) -> list:
        """A plain remote call on every rank (setup-time or metrics queries, not per step)."""
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return ray.get(refs, timeout=timeout or self.config.step_timeout_s)

    def shutdown(self, failed: bool = False) -> None:
        """Tear the group down. After a failure the actors are killed first: a rank stuck in
        a collective never leaves the compiled graph's loop, so the graph's own teardown
        must not wait on it."""
        with self._lock:
            self._shutdown(failed)

    def _shutdown(self, failed: bool) -> None:
        actors, self.actors, self.pids = self.actors, [], []
        if failed:
            for actor in actors:
                ray.kill(actor, no_restart=True)
        if self._dag is not None:
            try:
                self._dag.teardown()
            except Exception:  # noqa: BLE001 - its actors may already be gone
                logger.debug("compiled graph teardown", exc_info=True)
            self._dag = None
        if not failed:
            for actor in actors:
                ray.kill(actor, no_restart=True)
        if self._pg is not None and self._owns_pg:
            remove_placement_group(self._pg)
        self._pg = None
