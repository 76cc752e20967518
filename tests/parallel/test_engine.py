"""The engine over N expert-parallel Ray actors (gloo on CPU) on the tiny-moe checkpoint
(15 experts: divisible by none of 2, 3, 4): the same tokens and logprobs as one rank,
each rank holding only its experts. Recovery from a lost worker: test_parallel_faults.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.net import is_loopback, listening
from support.parallel_helpers import generate, make_engine

from gptoss_ray.config import PRESETS
from gptoss_ray.config import worker_env
from gptoss_ray.model.loader import load_model
from gptoss_ray.parallel.placement import ExpertPlacement
from gptoss_ray.parallel.rank import weight_bytes

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def ep_runs(ray_cluster, tiny_moe_ckpt) -> dict[int, dict]:
    """One engine per N, run once; the tests below check different things of each run."""
    runs = {}
    for ep_size in (2, 3, 4):
        engine = make_engine(tiny_moe_ckpt, ep_size)
        try:
            outputs, ranks = generate(engine)
            runs[ep_size] = dict(outputs=outputs, ranks=ranks, stats=engine.executor.stats(),
                                 listening=listening(engine.executor.group.pids),
                                 environ=[Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                                          for pid in engine.executor.group.pids],
                                 rendezvous=engine.executor.group.rendezvous,
                                 weight_bytes=engine.executor.weight_bytes(),
                                 expert_load=engine.stats().expert_load)
        finally:
            engine.shutdown()
    return runs


@pytest.mark.parametrize("ep_size", [2, 3, 4])
def test_ep_matches_one_rank(reference, ep_runs, ep_size):
    run = ep_runs[ep_size]
    assert run["ranks"] == set(range(ep_size)), "requests should be spread over every rank"
    for request_id, (tokens, logprobs) in reference["outputs"].items():
        got_tokens, got_logprobs = run["outputs"][request_id]
        assert got_tokens == tokens, request_id
        for expected, got in zip(logprobs, got_logprobs):
            assert expected.keys() == got.keys()
            for token, lp in expected.items():
                assert got[token] == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("ep_size", [2, 3, 4])
def test_ep_reports_expert_load_and_all_to_all_cost(reference, ep_runs, ep_size):
    run = ep_runs[ep_size]
    # Each rank counts its own tokens' routing; summed, it is the one-rank model's.
    assert run["expert_load"] == reference["expert_load"]
    stats = run["stats"]
    # Tokens did travel, and no more bytes than a per-pair dispatch would move (up to the
    # 2K id/weight columns of each row): a token goes once to each rank it needs.
    config = PRESETS["tiny-moe"]
    slack = 1 + config.num_experts_per_tok / config.hidden_size
    assert 0 < stats.mean_wire_bytes_per_step <= stats.mean_pair_wire_bytes_per_step * slack
    assert stats.mean_all_to_all_s_per_step > 0


@pytest.mark.parametrize("ep_size", [2, 3, 4])
def test_each_rank_holds_only_its_experts(tiny_moe_ckpt, ep_runs, ep_size):
    full = weight_bytes(load_model(tiny_moe_ckpt))
    per_rank = ep_runs[ep_size]["weight_bytes"]
    counts = ExpertPlacement(15, ep_size).counts()  # 8/7, 5/5/5, 4/4/4/3
    for measured, owned in zip(per_rank, counts, strict=True):
        assert measured["shared"] == full["shared"]
        assert measured["expert"] == full["expert"] * owned // 15
    assert sum(m["expert"] for m in per_rank) == full["expert"]


@pytest.mark.parametrize("ep_size", [2, 3, 4])
def test_rendezvous_store_and_collectives_listen_on_loopback_only(ep_runs, ep_size):
    """torch's TCPStore listens on every interface, unauthenticated, unless handed a bound
    socket; gloo listens where the host name resolves. Rank 0's store must be on 127.0.0.1,
    and each rank process's only other listener beyond loopback is Ray's own core-worker
    port (one per Ray worker process, present in any actor: see the README's security
    section for Ray's ports)."""
    sockets, (host, port) = ep_runs[ep_size]["listening"], ep_runs[ep_size]["rendezvous"]
    assert host == "127.0.0.1" and [(a, p) for _, a, p in sockets if p == port] == [(host, port)], sockets
    outside = [pid for pid, addr, _ in sockets if not is_loopback(addr)]
    assert len(outside) == len(set(outside)) <= ep_size, sockets  # at most Ray's one per process


def test_cpu_rank_processes_start_with_the_worker_env(ep_runs):
    """Each rank actor's process was started with engine/host_memory.worker_env (glibc reads
    it at start-up only: huge pages for the rank's weights and step temporaries)."""
    wanted = [f"{k}={v}".encode() for k, v in worker_env("cpu").items()]
    for ep_size, run in ep_runs.items():
        for environ in run["environ"]:
            assert all(w in environ for w in wanted), ep_size
