"""The engine over N expert-parallel Ray actors (gloo on CPU) on the tiny-moe checkpoint
(15 experts: divisible by none of 2, 3, 4): the same tokens and logprobs as one rank,
each rank holding only its experts, and recovery from a killed or hung worker."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from gptoss_ray.config import PRESETS
from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.engine.executor import InProcessExecutor
from gptoss_ray.engine.llm import LLM
from gptoss_ray.model.loader import load_model
from gptoss_ray.parallel.executor import RayExecutor
from gptoss_ray.parallel.placement import ExpertPlacement
from gptoss_ray.parallel.rank import weight_bytes
from gptoss_ray.sampling_params import SamplingParams

# Several concurrent requests of different prompt and output lengths.
PROMPTS = [[1, 2, 3, 4, 5], [7] * 11, [9, 8, 7], list(range(100, 120)), [42, 43], list(range(300, 309))]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def make_engine(ckpt, ep_size: int, **overrides) -> LLMEngine:
    """Built the way users build it, `LLM(model=..., ep_size=N)`; its engine is driven
    step by step below. Experts stay MXFP4-packed, as on the GPUs expert parallelism is for
    (and so each rank's expert bytes are the checkpoint's)."""
    config = dict(worker_num_cpus=0.1, num_kv_blocks=64, max_model_len=256, max_num_seqs=8, device="cpu",
                  dequantize_experts=False)
    engine = LLM(model=str(ckpt), ep_size=ep_size, dtype="float32", **(config | overrides)).engine
    assert isinstance(engine.executor, RayExecutor if ep_size > 1 else InProcessExecutor)
    return engine


def generate(engine: LLMEngine, prompts=PROMPTS, tag="r") -> tuple[dict, set[int]]:
    """Run prompts together to completion; return request -> (tokens, logprobs), and the
    ranks their sequences were placed on."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(temperature=0, max_tokens=4 + 2 * i, logprobs=2))
    outputs, ranks = {}, set()
    while engine.has_unfinished_requests():
        deltas = engine.step()
        ranks |= {seq.rank for seq in engine.scheduler.running}
        for d in deltas:
            tokens, logprobs = outputs.setdefault(d.request_id, ([], []))
            tokens.extend(d.token_ids)
            logprobs.extend(d.logprobs)
    return outputs, ranks


@pytest.fixture(scope="module")
def reference(tiny_moe_ckpt):
    engine = make_engine(tiny_moe_ckpt, 1)
    try:
        outputs, _ = generate(engine)
        return dict(outputs=outputs, expert_load=engine.stats()["expert_load"])
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def ep_runs(tiny_moe_ckpt) -> dict[int, dict]:
    """One engine per N, run once; the tests below check different things of each run."""
    runs = {}
    for ep_size in (2, 3, 4):
        engine = make_engine(tiny_moe_ckpt, ep_size)
        try:
            outputs, ranks = generate(engine)
            runs[ep_size] = dict(outputs=outputs, ranks=ranks, stats=engine.executor.stats(),
                                 weight_bytes=engine.executor.weight_bytes(),
                                 expert_load=engine.stats()["expert_load"])
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
    assert 0 < stats["mean_wire_bytes_per_step"] <= stats["mean_pair_wire_bytes_per_step"] * slack
    assert stats["mean_all_to_all_s_per_step"] > 0


@pytest.mark.parametrize("ep_size", [2, 3, 4])
def test_each_rank_holds_only_its_experts(tiny_moe_ckpt, ep_runs, ep_size):
    full = weight_bytes(load_model(tiny_moe_ckpt))
    per_rank = ep_runs[ep_size]["weight_bytes"]
    counts = ExpertPlacement(15, ep_size).counts()  # 8/7, 5/5/5, 4/4/4/3
    for measured, owned in zip(per_rank, counts, strict=True):
        assert measured["shared"] == full["shared"]
        assert measured["expert"] == full["expert"] * owned // 15
    assert sum(m["expert"] for m in per_rank) == full["expert"]


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
        assert engine.executor.stats()["num_rebuilds"] == 1
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
        assert engine.executor.stats()["num_rebuilds"] == 1
        assert victim not in engine.executor.worker_pids()
        outputs, _ = generate(engine, PROMPTS[:1], tag="next")
        assert outputs["next0"][0] == reference["outputs"]["r0"][0]
    finally:
        engine.shutdown()


def _kill_if_alive(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
