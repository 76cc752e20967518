"""Worker loss on the expert-parallel engine: a killed or hung worker mid-generation, one
dying while idle, and one whose output channel Ray freed before the group's teardown. Run by
tests/parallel/test_faults.py in a pytest process of its own (see there why);
`python -m pytest tests/parallel/parallel_fault_cases.py` runs them directly."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray
from support.parallel_helpers import PROMPTS, generate, make_engine

from gptoss_ray.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_lost_worker_fails_in_flight_requests_then_recovers(tiny_moe_ckpt, reference, sig):
    """A killed or hung (stopped) worker mid-generation: the in-flight requests end with
    finish_reason "error" within 30 s, the group is rebuilt, and a new request succeeds,
    its output unchanged even though its prompt's KV blocks were cached before the loss."""
    engine = make_engine(tiny_moe_ckpt, 2, step_timeout_s=10.0)
    doomed = {f"doomed{i}": PROMPTS[i] for i in (0, 3, 5)}  # 20 tokens: a full cached block
    victim = None
    try:
        for rid, prompt in doomed.items():
            engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=200))
        for _ in range(3):
            engine.step()
        # Submitting a plan blocks while a stopped rank has not read the last one: that wait
        # must be bounded by the step timeout too (it was 300 s, and 1 hang in 5 stalled that long).
        assert engine.executor.group._dag._submit_timeout <= 10.0
        victim = engine.executor.worker_pids()[1]
        os.kill(victim, sig)
        finished, start = {}, time.monotonic()
        # The bound: in-flight requests end with an error within 30 s.
        while engine.has_unfinished_requests() and time.monotonic() - start < 30:
            for d in engine.step():
                if d.finish_reason is not None:
                    finished[d.request_id] = d.finish_reason
        assert finished == {rid: "error" for rid in doomed}
        assert not engine.executor.group.is_running  # torn down, not left half-alive
        outputs, _ = generate(engine, [PROMPTS[3]], tag="after")
        assert outputs["after0"][0] == reference["outputs"]["r3"][0][:4]
        assert engine.executor.stats().num_rebuilds == 1
        assert victim not in engine.executor.worker_pids()
    finally:
        if victim is not None and sig == signal.SIGSTOP:
            _kill_if_alive(victim)
        engine.shutdown()


@pytest.mark.timeout(120)
def test_worker_dying_while_idle_is_replaced_by_the_health_check(tiny_moe_ckpt, reference):
    engine = make_engine(tiny_moe_ckpt, 2, step_timeout_s=10.0)
    try:
        victim = engine.executor.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        engine.executor.check_health()  # what Serve calls periodically
        assert engine.executor.stats().num_rebuilds == 1
        assert victim not in engine.executor.worker_pids()
        outputs, _ = generate(engine, PROMPTS[:1], tag="next")
        assert outputs["next0"][0] == reference["outputs"]["r0"][0]
    finally:
        engine.shutdown()


@pytest.mark.timeout(120)
def test_group_torn_down_after_its_dead_rank_output_was_freed(tiny_moe_ckpt):
    """The crash behind this file's child process, made deterministic: a rank dies before the
    driver ever read the compiled graph's outputs, and the group is torn down only after
    Ray freed that rank's output channel (owned by the dead rank). Ray registers the driver
    as the channel's reader inside teardown if it has not yet, and registering against a
    freed object aborts the process (RAY_CHECK in RegisterReaderChannel). The group now
    registers at start; without that, this case killed its process in every run.

    Ray's graph monitor thread would tear the graph down itself as soon as it sees the
    death, usually before the object is freed; it is held back here to make the order the
    one a loaded machine produced (the health check's teardown coming second)."""
    engine = make_engine(tiny_moe_ckpt, 2, step_timeout_s=10.0)
    group = engine.executor.group
    try:
        monitor = group._dag._monitor
        monitor.teardown = lambda kill_actors=False: None  # shadows the method until deleted
        victim_actor, victim = group.actors[1], engine.executor.worker_pids()[1]
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(victim_actor.pid.remote(), timeout=60)
        time.sleep(3)  # the raylet frees what the dead rank owned shortly after its death
        del monitor.teardown
        engine.executor.check_health()  # tears the group down (the abort was here), rebuilds it
        assert engine.executor.stats().num_rebuilds == 1
        assert victim not in engine.executor.worker_pids()
    finally:
        engine.shutdown()


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
