"""The static decode runner (engine/decode_runner.py) on CPU, forced on: the same buffers,
bucket padding and scratch KV slot a CUDA graph replays, without the graph. Its greedy
tokens and logprobs must equal the eager path's, and its padding rows must touch no live
KV slot and count in no metric."""

from __future__ import annotations

import math

import pytest
import torch
from support.engine_helpers import drain, make_engine, prompt

from gptoss_ray.config import FULL_ATTENTION, SLIDING_ATTENTION
from gptoss_ray.engine.decode_runner import DecodeRunner, default_buckets
from gptoss_ray.sampling_params import SamplingParams

BUCKETS = [1, 2, 4]  # small, so a test's batches land on, between and above buckets


def greedy(max_tokens: int, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=3, n=n)


class Spy:
    """Records the real and padded batch size of each step the runner ran."""

    def __init__(self, runner: DecodeRunner):
        self.runner, self.inner, self.batches = runner, runner.run, []
        runner.run = self

    def __call__(self, input_ids, positions, rows):
        self.batches.append((len(input_ids), self.runner.bucket(len(input_ids))))
        return self.inner(input_ids, positions, rows)


def run(engine, requests):
    """(request id, index) -> (tokens, logprob dicts)."""
    for rid, (tokens, params) in requests.items():
        engine.add_request(rid, tokens, params)
    deltas = []
    drain(engine, deltas_out=deltas)
    out: dict = {}
    for d in deltas:
        toks, lps = out.setdefault((d.request_id, d.index), ([], []))
        toks.extend(d.token_ids)
        lps.extend(d.logprobs or [])
    return out


def assert_same(static: dict, eager: dict) -> None:
    assert static.keys() == eager.keys()
    for key in eager:
        assert static[key][0] == eager[key][0], key
        for got, want in zip(static[key][1], eager[key][1], strict=True):
            assert got.keys() == want.keys(), key
            for tok in want:
                assert math.isclose(got[tok], want[tok], abs_tol=1e-4), (key, tok, got[tok], want[tok])


def compare(ckpt, requests, **engine_kwargs):
    """Run the requests on an eager engine and on a static one; return the static engine's spy."""
    eager = make_engine(ckpt, **engine_kwargs)
    assert eager.executor.worker.decode_runner is None  # CPU default: eager, unchanged
    static = make_engine(ckpt, static_decode=True, cuda_graph_sizes=BUCKETS, **engine_kwargs)
    spy = Spy(static.executor.worker.decode_runner)
    assert_same(run(static, requests), run(eager, requests))
    assert static.executor.worker.expert_load() == eager.executor.worker.expert_load()  # padding counts nowhere
    return spy


def test_default_buckets():
    assert default_buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert default_buckets(3) == [1, 2, 3]
    assert default_buckets(256)[-2:] == [248, 256]


def test_batches_on_between_and_above_buckets_match_eager(tiny_ckpt):
    # six sequences finishing one after another: decode batches 6, 5 (above the largest
    # bucket: eager), 4 (on), 3 (between: padded to 4), 2, 1
    requests = {f"r{i}": (prompt(5 + 2 * i, seed=i), greedy(3 + 2 * i)) for i in range(6)}
    spy = compare(tiny_ckpt, requests)
    assert {(3, 4), (4, 4), (2, 2), (1, 1)} <= set(spy.batches)
    assert all(n <= 4 for n, _ in spy.batches)  # 5 and 6 ran eagerly


def test_prefix_cache_hit_and_n_samples_match_eager(tiny_ckpt):
    shared = prompt(16, seed=7)
    requests = {"a": (shared + prompt(3, seed=8), greedy(6, n=3)), "b": (shared + prompt(5, seed=9), greedy(5))}
    spy = compare(tiny_ckpt, requests)
    assert (3, 4) in spy.batches or (4, 4) in spy.batches


def test_preemption_matches_eager(tiny_ckpt):
    requests = {f"r{i}": (prompt(10 + 3 * i, seed=100 + i), greedy(12)) for i in range(6)}
    kwargs = dict(num_kv_blocks=12, max_model_len=48, enable_prefix_caching=False)
    spy = compare(tiny_ckpt, requests, **kwargs)
    assert spy.batches
    small = make_engine(tiny_ckpt, static_decode=True, cuda_graph_sizes=BUCKETS, **kwargs)
    run(small, requests)
    assert small.stats().num_preemptions > 0


def test_sliding_window_past_128_tokens_matches_eager(tiny_ckpt):
    # the tiny preset's window is 8 tokens; positions run past 128 so both the window and
    # recycled sliding blocks (-1 in the table) are crossed many times over
    requests = {"long": (prompt(126, seed=3), greedy(12)), "short": (prompt(9, seed=4), greedy(20)),
                "mid": (prompt(60, seed=5), greedy(16))}
    spy = compare(tiny_ckpt, requests, max_model_len=256)
    assert (3, 4) in spy.batches


def live_slots(worker, kind: str) -> torch.Tensor:
    """Flat KV slots of every block a live sequence holds in pool `kind`."""
    blocks = worker.block_tables[kind][: worker.config.max_num_seqs]
    blocks = blocks[blocks >= 0].long()
    bs = worker.block_size
    return (blocks[:, None] * bs + torch.arange(bs)).flatten()


def test_padding_rows_write_only_the_scratch_slot(tiny_ckpt):
    engine = make_engine(tiny_ckpt, static_decode=True, cuda_graph_sizes=[4])
    worker = engine.executor.worker
    for i in range(3):  # three sequences: each decode step is padded 3 -> 4
        engine.add_request(f"r{i}", prompt(6 + i, seed=i), greedy(4))
    engine.step()  # the prefills
    assert len(worker.seqs) == 3 and all(s.num_computed_tokens == len(s.token_ids) - 1 for s in worker.seqs.values())
    scratch = {kind: int(worker.block_tables[kind][worker.config.max_num_seqs, 0]) for kind in worker.block_tables}
    for kind, (k, _) in zip(worker.model_config.layer_types, worker.kv_caches):
        assert scratch[kind] == k.shape[0] - 1  # the extra block past the KV manager's pool
    # NaN everywhere but the blocks live sequences hold: a stray write shows as a non-NaN
    # slot, a stray read as a NaN output
    live = {kind: live_slots(worker, kind) for kind in worker.block_tables}
    kinds = worker.model_config.layer_types
    for kind, (k, v) in zip(kinds, worker.kv_caches):
        for cache in (k, v):
            flat = cache.view(-1, *cache.shape[2:])
            keep = flat[live[kind]].clone()
            flat.fill_(float("nan"))
            flat[live[kind]] = keep
    before = [(k.clone(), v.clone()) for k, v in worker.kv_caches]
    positions = {s.row: len(s.token_ids) - 1 for s in worker.seqs.values()}  # the slot each decode writes
    spy = Spy(worker.decode_runner)
    deltas = engine.step()
    assert spy.batches == [(3, 4)]
    for d in deltas:
        assert all(math.isfinite(lp) for lps in d.logprobs for lp in lps.values())
    bs = worker.block_size
    for kind, (k0, v0), (k1, v1) in zip(kinds, before, worker.kv_caches):
        table = worker.block_tables[kind]
        written = {int(table[row, pos // bs]) * bs + pos % bs for row, pos in positions.items()}
        written.add(scratch[kind] * bs)  # the padding row's slot 0 of the scratch block
        for old, new in ((k0, k1), (v0, v1)):
            old, new = old.view(-1, *old.shape[2:]), new.view(-1, *new.shape[2:])
            changed = ~((old == new) | (old.isnan() & new.isnan())).all(dim=(1, 2))
            assert set(changed.nonzero().flatten().tolist()) == written, kind


def test_scratch_block_is_outside_the_kv_managers_pool(tiny_ckpt):
    engine = make_engine(tiny_ckpt, static_decode=True, num_kv_blocks=64)
    worker = engine.executor.worker
    assert worker.block_tables[FULL_ATTENTION][worker.config.max_num_seqs, 0] == 64
    assert worker.block_tables[SLIDING_ATTENTION][worker.config.max_num_seqs, 0] == worker.config.num_sliding_blocks
    assert worker.kv_caches[0][0].shape[0] in (64 + 1, worker.config.num_sliding_blocks + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_match_eager(tiny_ckpt):
    """The captured graphs replay the same tokens and logprobs as eager CUDA decode."""
    requests = {f"r{i}": (prompt(5 + 2 * i, seed=i), greedy(3 + 2 * i)) for i in range(6)}
    kwargs = dict(device="cuda", dtype="float32", cuda_graph_sizes=BUCKETS)
    eager = make_engine(tiny_ckpt, enforce_eager=True, **kwargs)
    assert eager.executor.worker.decode_runner is None
    graphs = make_engine(tiny_ckpt, **kwargs)
    runner = graphs.executor.worker.decode_runner
    assert sorted(runner.graphs) == BUCKETS
    spy = Spy(runner)
    assert_same(run(graphs, requests), run(eager, requests))
    assert (3, 4) in spy.batches


@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [2, 3])
def test_expert_parallel_static_decode_matches_one_eager_rank(ray_cluster, reference, tiny_moe_ckpt, ep_size):
    """Each rank pads its own decode rows (tiny-moe's 15 experts over 2 ranks: uneven);
    padding rows travel through the all-to-all but change no real row. (The expert-load
    metric's padding exclusion is checked on one rank above: the engine's EP snapshot is
    taken on its first step, a prefill.)"""
    from support.parallel_helpers import generate
    from support.parallel_helpers import make_engine as make_ep_engine

    engine = make_ep_engine(tiny_moe_ckpt, ep_size, static_decode=True, cuda_graph_sizes=[4])  # every step padded
    try:
        outputs, ranks = generate(engine)
    finally:
        engine.shutdown()
    assert ranks == set(range(ep_size))
    assert outputs.keys() == reference["outputs"].keys()
    for rid, (tokens, logprobs) in reference["outputs"].items():
        assert outputs[rid][0] == tokens, rid
        for want, got in zip(logprobs, outputs[rid][1], strict=True):
            assert want.keys() == got.keys()
            for tok, lp in want.items():
                assert math.isclose(got[tok], lp, abs_tol=1e-4)
