"""Scheduler and block manager on their own (no model): placement, sliding-window
recycling, prefix cache bookkeeping, per-rank preemption, pool sizing."""

from __future__ import annotations

from gptoss_ray.config import PRESETS
from gptoss_ray.engine.kv_cache import KVCacheManager, plan_num_blocks, sliding_blocks_needed
from gptoss_ray.engine.plan import FULL, SLIDING
from gptoss_ray.engine.scheduler import Scheduler
from gptoss_ray.engine.sequence import Sequence
from gptoss_ray.sampling_params import SamplingParams

BS, WINDOW = 4, 8


def managers(num_ranks=1, blocks=64, sliding=64):
    return [KVCacheManager(blocks, sliding, BS, WINDOW) for _ in range(num_ranks)]


def seq(tokens, rid="r", index=0) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(max_tokens=100), index=index)


def step(scheduler: Scheduler, sample_token=7):
    """One step as the engine does it, with the worker pretending to sample `sample_token`."""
    plan, scheduled = scheduler.schedule()
    for s, n in scheduled:
        s.num_computed_tokens += n
        scheduler.kv[s.rank].register_computed(s, s.num_computed_tokens // BS)
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(sample_token)
    return plan, scheduled


def test_placement_balances_ranks_by_kv_usage():
    sched = Scheduler(managers(num_ranks=2), max_num_seqs=8, max_num_batched_tokens=512)
    seqs = [seq(range(100 + 10 * i, 110 + 10 * i), rid=f"r{i}") for i in range(4)]
    for s in seqs:
        sched.add(s)
    plan, _ = step(sched)
    assert [s.rank for s in seqs] == [0, 1, 0, 1]
    assert [len(r.seq_ids) for r in plan.ranks] == [2, 2]


def test_prefix_hit_places_on_the_rank_holding_it():
    sched = Scheduler(managers(num_ranks=2), max_num_seqs=8, max_num_batched_tokens=512)
    first = seq(range(1, 20), rid="a")
    sched.add(first)
    step(sched)
    sched.add(seq(range(500, 540), rid="big"))  # makes rank 1 the least used
    step(sched)
    later = seq(list(range(1, 17)) + [99, 98], rid="b")
    sched.add(later)
    step(sched)
    assert later.rank == first.rank and later.num_cached_tokens == 16


def test_sliding_blocks_behind_the_window_are_recycled():
    kv = managers(blocks=32, sliding=32)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=512)
    s = seq(range(1, 22))  # 21 tokens = 6 blocks
    sched.add(s)
    step(sched)
    for _ in range(3):  # decode: each step recycles what falls behind the window
        step(sched)
    # the last step's query (position 23) sees keys >= 16: blocks 0..3 (positions 0..15) are gone
    table = kv[0].table(s)
    assert table.sliding[:4] == [-1] * 4 and min(table.sliding[4:]) >= 0
    assert len(table.full) == 6 and min(table.full) >= 0
    assert kv[0].sliding.num_free == 32 - 2 and kv[0].full.num_free == 32 - 6
    updates = kv[0].updates[SLIDING]
    assert updates.blocks == [] and kv[0].updates[FULL].blocks == []  # drained into the plans


def test_preemption_takes_the_newest_sequence_on_the_same_rank():
    kv = [KVCacheManager(4, 4, BS, WINDOW), KVCacheManager(4, 4, BS, WINDOW)]
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=512)
    a, b, c = seq(range(1, 8), rid="a"), seq(range(20, 27), rid="b"), seq(range(40, 47), rid="c")
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    assert (a.rank, b.rank, c.rank) == (0, 1, 0)  # 2 blocks each; rank 0 is now full
    step(sched)  # position 7: still in each one's second block
    plan, scheduled = step(sched)  # position 8: a needs a third block on rank 0
    assert sched.num_preemptions == 1 and c.rank == -1 and sched.waiting[0] is c
    assert [s.request_id for s, _ in scheduled] == ["a", "b"]
    assert c.num_computed_tokens == 0 and len(c.output_token_ids) == 2  # output kept for the recompute
    assert plan.ranks[0].finished_ids == [c.seq_id] and plan.ranks[1].finished_ids == []


def test_n_samples_stay_on_sample_zeros_rank():
    sched = Scheduler(managers(num_ranks=3), max_num_seqs=8, max_num_batched_tokens=512)
    parent = seq(range(1, 14), rid="n")
    sched.add(parent)
    step(sched)
    child = seq(range(1, 14), rid="n", index=1)
    child.rank_hint = parent.rank
    sched.add(child, front=True)
    step(sched)
    assert child.rank == parent.rank and child.num_cached_tokens == 12


def test_pool_sizing_for_gpt_oss_120b():
    cfg = PRESETS["gpt-oss-120b"]
    per_token_full = 18 * 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # 18 full layers, k+v, bf16
    assert per_token_full == 36 * 1024
    needed = sliding_blocks_needed(128, 16, max_num_seqs=256, max_num_batched_tokens=2048)
    assert needed == 256 * 10 + 128
    full, sliding = plan_num_blocks(40 * 2**30, 16 * per_token_full, 16 * per_token_full, needed)
    assert sliding == needed and full * 16 * per_token_full + sliding * 16 * per_token_full <= 40 * 2**30
    assert full > 60_000  # ~1M tokens of context in 40 GiB


def test_skipping_append_slots_between_block_boundaries_changes_no_table():
    """The scheduler skips append_slots while a sequence's new tokens fit its blocks and no
    sliding block falls behind the window (Sequence.kv_room / kv_recycle_at): the tables
    and their updates must equal those of a manager called every step."""
    sched = Scheduler(managers(blocks=64, sliding=64), max_num_seqs=4, max_num_batched_tokens=512)
    ref = managers(blocks=64, sliding=64)[0]
    prompts = [range(10 * i + 1, 10 * i + 6 + i) for i in range(3)]  # no shared prefix: no cache hits
    seqs = [seq(p, rid=f"r{i}") for i, p in enumerate(prompts)]
    mirrors = [seq(p, rid=f"m{i}") for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    calls = 0
    original = sched.kv[0].append_slots

    def counting(s, n):
        nonlocal calls
        calls += 1
        return original(s, n)

    sched.kv[0].append_slots = counting
    for i in range(40):
        plan, scheduled = sched.schedule()
        for (s, n), m in zip(scheduled, mirrors):
            if i == 0:
                ref.allocate(m, 0, n)
            else:
                m.num_computed_tokens = s.num_computed_tokens
                m.token_ids = list(s.token_ids)
                assert ref.append_slots(m, n)
        ours, theirs = plan.ranks[0].table_updates, ref.drain_updates()
        for kind in (FULL, SLIDING):
            assert (ours[kind].cols, ours[kind].blocks) == (theirs[kind].cols, theirs[kind].blocks), (i, kind)
        for s, n in scheduled:
            s.num_computed_tokens += n
            sched.kv[0].register_computed(s, s.num_computed_tokens // BS)
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)
    for s, m in zip(seqs, mirrors):
        assert sched.kv[0].table(s).full == ref.table(m).full
        assert sched.kv[0].table(s).sliding == ref.table(m).sliding
    assert calls < 40 * 3 / 2  # the skip is taken: roughly one call in BS, plus recycling
