"""Engine behaviour on the real tiny model: batching, preemption, abort, prefix cache, chunked prefill."""

from __future__ import annotations

import pytest
from support.engine_helpers import GREEDY, drain, greedy_by_recompute, make_engine, prompt, run_all

from gptoss_ray.engine.executor import InProcessExecutor
from gptoss_ray.parallel.errors import WorkerGroupError
from gptoss_ray.sampling_params import SamplingParams


def test_incremental_decode_equals_full_recompute(tiny_ckpt):
    # 21 tokens with 4-token blocks: the sliding layers (window 8) recycle blocks on the way.
    tokens = prompt(21, seed=1)
    out = run_all(make_engine(tiny_ckpt), {"r": (tokens, GREEDY)})
    assert out[("r", 0)] == greedy_by_recompute(tiny_ckpt, tokens, GREEDY.max_tokens)


def test_batch_invariance_16_mixed_lengths(tiny_ckpt):
    engine = make_engine(tiny_ckpt)
    requests = {f"r{i}": (prompt(3 + 5 * i, seed=i), GREEDY) for i in range(16)}
    together = run_all(engine, requests)
    for rid, req in requests.items():
        alone = run_all(engine, {rid: req})
        assert alone[(rid, 0)] == together[(rid, 0)], rid
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_preemption_finishes_everything_with_identical_output(tiny_ckpt):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = {f"r{i}": (prompt(10 + 3 * i, seed=100 + i), params) for i in range(6)}
    # 12 blocks of 4 tokens hold 48 tokens; the six requests need 6 x ~30.
    small = make_engine(tiny_ckpt, num_kv_blocks=12, max_model_len=48, enable_prefix_caching=False)
    large = make_engine(tiny_ckpt)
    assert run_all(small, requests) == run_all(large, requests)
    assert small.stats().num_preemptions > 0
    assert large.stats().num_preemptions == 0
    assert small.stats().num_free_blocks == 12


def test_seeded_sampling_survives_preemption(tiny_ckpt):
    # top_k keeps the draw away from near-ties: the random model's distribution over 201k
    # tokens is nearly flat, and recompute (a prefill chunk) rounds attention differently
    # from the decode step it replaces, by ~1 ulp, which is enough to move an inverse-CDF
    # draw across a boundary between two tokens of probability ~5e-6.
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=12, seed=7, ignore_eos=True)
    requests = {f"r{i}": (prompt(10 + 3 * i, seed=200 + i), params) for i in range(6)}
    small = make_engine(tiny_ckpt, num_kv_blocks=12, max_model_len=48)
    assert run_all(small, requests) == run_all(make_engine(tiny_ckpt), requests)
    assert small.stats().num_preemptions > 0


def test_abort_frees_every_block_whether_prefilling_or_decoding(tiny_ckpt):
    engine = make_engine(tiny_ckpt, max_num_batched_tokens=16)
    total = engine.stats().num_free_blocks
    engine.add_request("decoding", prompt(9, seed=4), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.add_request("prefilling", prompt(60, seed=3), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(2):
        engine.step()
    decoding, prefilling = (engine.requests[r].seqs[0] for r in ("decoding", "prefilling"))
    assert decoding.num_output_tokens >= 2 and 0 < prefilling.num_computed_tokens < 60
    free, held = engine.stats().num_free_blocks, len(engine.kv[prefilling.rank].table(prefilling).full)
    assert held >= 5
    engine.abort_request("prefilling")
    assert engine.stats().num_free_blocks == free + held
    engine.abort_request("decoding")
    assert engine.stats().num_free_blocks == total
    assert engine.stats().num_running == 0 and not engine.has_unfinished_requests()
    engine.step()  # tells the worker to forget them
    assert engine.executor.worker.seqs == {}


def test_abort_waiting_request_never_runs(tiny_ckpt):
    engine = make_engine(tiny_ckpt, max_num_seqs=1)
    engine.add_request("running", prompt(5, seed=5), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.add_request("waiting", prompt(5, seed=6), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    assert engine.stats().num_waiting == 1
    engine.abort_request("waiting")
    out = drain(engine)
    assert set(out) == {("running", 0)}
    assert engine.stats().num_waiting == 0


def test_prefix_cache_hit_equals_miss_and_is_counted(tiny_ckpt):
    shared = prompt(24, seed=8)
    a, b = shared + prompt(5, seed=9), shared + prompt(7, seed=10)
    cold = make_engine(tiny_ckpt, enable_prefix_caching=False)
    expected = run_all(cold, {"b": (b, GREEDY)})
    assert cold.stats().prefix_cache_hits == 0
    warm = make_engine(tiny_ckpt)
    run_all(warm, {"a": (a, GREEDY)})
    hits_before = warm.stats().prefix_cache_hits
    assert run_all(warm, {"b": (b, GREEDY)}) == expected
    assert warm.stats().prefix_cache_hits - hits_before == 24  # six shared 4-token blocks
    assert warm.stats().prefix_cache_queries == len(a) + len(b)


@pytest.mark.parametrize("changed", [11, 23])  # the last token of the 3rd and the 6th 4-token block
def test_prefix_cache_tells_apart_prompts_differing_in_a_blocks_last_token(tiny_ckpt, changed):
    """A block's hash covers every token it holds: a prompt differing from a cached one only
    in the last token of a full block hits the blocks before it and no further, and its
    greedy output is what it is without any cache (a hash that left out that token once
    gave a false hit and another model's output)."""
    a = prompt(30, seed=21)
    b = list(a)
    b[changed] = (a[changed] + 1) % 200
    cold = run_all(make_engine(tiny_ckpt, enable_prefix_caching=False), {"b": (b, GREEDY)})
    warm = make_engine(tiny_ckpt)
    run_all(warm, {"a": (a, GREEDY)})
    before = warm.stats().prefix_cache_hits
    assert run_all(warm, {"b": (b, GREEDY)}) == cold
    assert warm.stats().prefix_cache_hits - before == (changed // 4) * 4


def test_chunked_prefill_interleaves_with_decodes(tiny_ckpt):
    engine = make_engine(tiny_ckpt, max_num_batched_tokens=16, max_model_len=256)
    engine.add_request("decode", prompt(4, seed=11), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # prefill of the short request
    engine.add_request("long", prompt(100, seed=12), SamplingParams(max_tokens=2, ignore_eos=True))
    steps_with_decode = 0
    while not _prefilled(engine, "long"):
        deltas = engine.step()
        steps_with_decode += any(d.request_id == "decode" for d in deltas)
        assert engine.scheduler.running[0].request_id == "decode"
    # 100 tokens in chunks of at most 15 (16 minus the decode): >= 7 steps, a decode token in each.
    assert steps_with_decode >= 7
    drain(engine)


def test_chunked_prefill_output_equals_one_shot_prefill(tiny_ckpt):
    # "short" goes first, so "long" is prefilled in chunks of 9 then 15 tokens (beside the
    # decode): longer than the sliding window (8), not aligned to the 4-token blocks
    requests = {"short": (prompt(7, seed=17), GREEDY), "long": (prompt(100, seed=16), GREEDY)}
    chunked = run_all(make_engine(tiny_ckpt, max_num_batched_tokens=16), requests)
    assert chunked == run_all(make_engine(tiny_ckpt), requests)


def _prefilled(engine, request_id) -> bool:
    req = engine.requests.get(request_id)
    return req is None or req.seqs[0].is_prefill_done


def test_n_samples_share_prompt_blocks(tiny_ckpt):
    engine = make_engine(tiny_ckpt, enable_prefix_caching=False)
    tokens = prompt(17, seed=13)
    out = run_all(engine, {"r": (tokens, SamplingParams(n=3, temperature=0.0, max_tokens=5, ignore_eos=True))})
    one = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    single = run_all(make_engine(tiny_ckpt), {"r": (tokens, one)})
    assert out[("r", 0)] == out[("r", 1)] == out[("r", 2)] == single[("r", 0)]
    # samples 1 and 2 reuse sample 0's four full prompt blocks (16 tokens) each
    assert engine.stats().prefix_cache_hits == 2 * 16


def test_n_seeded_samples_differ_and_reproduce(tiny_ckpt):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True)
    tokens = prompt(9, seed=14)
    first = run_all(make_engine(tiny_ckpt), {"r": (tokens, params)})
    second = run_all(make_engine(tiny_ckpt), {"r": (tokens, params), "other": (prompt(12, seed=15), params)})
    assert len({tuple(v) for v in first.values()}) == 3
    assert all(second[k] == v for k, v in first.items())


def test_too_long_request_is_rejected_not_stalled(tiny_ckpt):
    from gptoss_ray.errors import SamplingParamsError

    engine = make_engine(tiny_ckpt, num_kv_blocks=8, max_model_len=256)
    assert engine.max_model_len == 8 * 4  # capped to what the pool holds
    with pytest.raises(SamplingParamsError) as err:
        engine.add_request("r", prompt(30, seed=1), SamplingParams(max_tokens=10))
    assert err.value.param == "max_tokens"


class _FailOnce(InProcessExecutor):
    """The real in-process worker, with one injected group failure: the new worker after
    it knows nothing of the old sequences, as after a Ray worker group rebuild."""

    def __init__(self, engine, fail_at_step: int):
        self.inner, self.fail_at_step, self.steps = engine.executor, fail_at_step, 0
        self.worker_config = engine.worker_config

    def execute(self, plan):
        self.steps += 1
        if self.steps == self.fail_at_step:
            self.inner = InProcessExecutor(self.worker_config)
            raise WorkerGroupError("rank 1 died")
        return self.inner.execute(plan)


def test_lost_workers_fail_running_requests_and_the_engine_recovers(tiny_ckpt):
    engine = make_engine(tiny_ckpt, max_num_seqs=2)
    requests = {f"r{i}": (prompt(8 + i, seed=20 + i), GREEDY) for i in range(3)}
    expected = run_all(make_engine(tiny_ckpt), requests)
    engine.executor = _FailOnce(engine, fail_at_step=3)
    deltas = []
    out = run_all(engine, requests, on_step=lambda e, ds: deltas.extend(ds))
    finish = {d.request_id: d.finish_reason for d in deltas if d.finished}
    assert finish == {"r0": "error", "r1": "error", "r2": "length"}  # r2 was waiting: it survives
    assert out[("r2", 0)] == expected[("r2", 0)]
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
    assert run_all(engine, {"again": requests["r0"]})[("again", 0)] == expected[("r0", 0)]


def test_cpu_engine_unpacks_experts_by_default_with_the_packed_output(tiny_ckpt):
    """dequantize_experts=None (auto) unpacks MXFP4 experts on CPU; the packed engine (the
    GPU layout, dequantizing inside every step) gives the same greedy tokens."""
    requests = {f"r{i}": (prompt(4 + 7 * i, seed=30 + i), GREEDY) for i in range(6)}
    auto, packed = make_engine(tiny_ckpt), make_engine(tiny_ckpt, dequantize_experts=False)
    experts = [m.experts for m in auto.executor.worker.model.moe_layers()]
    assert all(hasattr(e, "gate_up_weight") and not hasattr(e, "gate_up_blocks") for e in experts)
    experts = [m.experts for m in packed.executor.worker.model.moe_layers()]
    assert all(hasattr(e, "gate_up_blocks") and not hasattr(e, "gate_up_weight") for e in experts)
    assert run_all(auto, requests) == run_all(packed, requests)
