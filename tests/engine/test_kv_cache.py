"""KVCacheManager on its own (no model, no scheduler): allocation and free, the prefix cache's
hits and misses, sliding-window recycling, and the block tables it owns."""

from __future__ import annotations

import pytest

from gptoss_ray.engine.kv_cache import KVCacheManager
from gptoss_ray.engine.plan import FULL, SLIDING
from gptoss_ray.engine.sequence import Sequence
from gptoss_ray.sampling_params import SamplingParams

BS, WINDOW = 4, 8


def seq(tokens) -> Sequence:
    return Sequence("r", list(tokens), len(tokens), SamplingParams())


def admit(kv: KVCacheManager, s: Sequence, num_new: int | None = None) -> int:
    """Admit `s` with whatever prefix the cache holds, computing the rest; returns the hit blocks."""
    hit = kv.find_prefix(s)
    n = s.num_tokens - hit * BS if num_new is None else num_new
    assert kv.can_allocate(s, hit, n)
    kv.allocate(s, hit, n)
    return hit


def compute(kv: KVCacheManager, s: Sequence, n: int) -> None:
    """What the engine does after a step that computed `n` tokens of `s`."""
    s.num_computed_tokens += n
    kv.register_computed(s, s.num_computed_tokens // BS)


def test_allocate_takes_one_block_per_block_size_tokens_and_free_returns_them():
    kv = KVCacheManager(16, 16, BS, WINDOW)
    s = seq(range(1, 11))  # 10 tokens: 3 blocks
    admit(kv, s)
    table = kv.table(s)
    assert len(table.full) == 3 and len(set(table.full)) == 3
    assert len(table.sliding) == 3
    assert kv.full.num_free == 13 and kv.sliding.num_free == 13
    kv.free(s)
    assert kv.full.num_free == 16 and kv.sliding.num_free == 16
    assert s.seq_id not in kv.tables  # the table goes with the blocks


def test_append_slots_grows_the_table_only_at_block_boundaries():
    kv = KVCacheManager(16, 16, BS, None)  # no sliding pool
    s = seq(range(1, 5))  # exactly one block
    admit(kv, s)
    compute(kv, s, 4)
    assert kv.append_slots(s, 1) and len(kv.table(s).full) == 2  # token 5 opens block 2
    compute(kv, s, 1)
    assert kv.append_slots(s, 3) and len(kv.table(s).full) == 2  # tokens 6..8 fit in it
    assert kv.sliding is None and kv.table(s).sliding == []


def test_a_short_pool_refuses_without_taking_anything():
    kv = KVCacheManager(3, 3, BS, WINDOW)
    s = seq(range(1, 9))  # 2 blocks
    admit(kv, s)
    compute(kv, s, 8)
    free_before = kv.full.num_free
    assert not kv.append_slots(s, 8)  # needs 2 more blocks, 1 is free
    assert kv.full.num_free == free_before and len(kv.table(s).full) == 2
    assert not kv.can_allocate(seq(range(50, 59)), 0, 9)


def test_every_table_change_is_recorded_for_the_workers():
    kv = KVCacheManager(16, 16, BS, WINDOW)
    s = seq(range(1, 10))  # 3 blocks
    admit(kv, s)
    updates = kv.drain_updates()
    assert updates[FULL].seq_ids == [s.seq_id] * 3 and updates[FULL].cols == [0, 1, 2]
    assert updates[FULL].blocks == kv.table(s).full
    assert updates[SLIDING].blocks == kv.table(s).sliding
    assert kv.drain_updates()[FULL].blocks == []  # drained


def test_prefix_cache_hit_shares_full_blocks_and_miss_after_a_changed_token():
    kv = KVCacheManager(32, 32, BS, WINDOW)
    a = seq(range(1, 14))  # 13 tokens: 3 full blocks
    admit(kv, a)
    compute(kv, a, a.num_tokens)
    b = seq(list(range(1, 13)) + [99, 98])  # same first 12 tokens
    assert admit(kv, b) == 3
    assert kv.table(b).full[:3] == kv.table(a).full[:3]  # the same physical blocks
    assert b.num_computed_tokens == 12 and b.num_cached_tokens == 12
    c = seq([1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13])  # differs inside block 1
    assert admit(kv, c) == 1  # only block 0 matches: a block is named by everything before it
    assert kv.table(c).full[0] == kv.table(a).full[0] and kv.table(c).full[1] != kv.table(a).full[1]


def test_a_hit_always_leaves_one_token_to_compute():
    kv = KVCacheManager(32, 32, BS, WINDOW)
    a = seq(range(1, 9))  # exactly 2 blocks
    admit(kv, a)
    compute(kv, a, 8)
    b = seq(range(1, 9))
    assert kv.find_prefix(b) == 1  # not 2: the last token must be computed to get logits


def test_freed_named_blocks_stay_findable_until_reused():
    kv = KVCacheManager(4, 4, BS, WINDOW)
    a = seq(range(1, 10))  # 3 blocks, 2 of them full
    admit(kv, a)
    compute(kv, a, 9)
    kv.free(a)
    assert admit(kv, seq(range(1, 10))) == 2  # revived from the free list
    kv2 = KVCacheManager(4, 4, BS, WINDOW)
    a = seq(range(1, 10))
    admit(kv2, a)
    compute(kv2, a, 9)
    kv2.free(a)
    other = seq(range(200, 216))  # 4 blocks: takes every block, evicting a's names
    admit(kv2, other)
    kv2.free(other)
    assert kv2.find_prefix(seq(range(1, 10))) == 0


def test_sliding_blocks_behind_the_window_are_recycled_deepest_first():
    kv = KVCacheManager(32, 32, BS, WINDOW)
    s = seq(range(1, 5))
    admit(kv, s)
    for _ in range(20):  # decode to 24 tokens, one at a time
        compute(kv, s, s.num_tokens - s.num_computed_tokens)
        s.token_ids.append(7)
        assert kv.append_slots(s, 1)
    table = kv.table(s)
    # the next query (position 23) sees keys 16..23: blocks 0..3 are recycled
    assert table.sliding[:4] == [-1] * 4 and all(b >= 0 for b in table.sliding[4:])
    assert table.num_sliding_freed == 4
    assert len(table.full) == 6 and all(b >= 0 for b in table.full)  # full layers keep everything
    assert kv.sliding.num_free == 32 - 2 and kv.full.num_free == 32 - 6
    recycled = kv.drain_updates()[SLIDING]
    assert [c for c, b in zip(recycled.cols, recycled.blocks) if b == -1] == [0, 1, 2, 3]


def test_a_prefix_hit_needs_the_sliding_blocks_inside_the_window():
    kv = KVCacheManager(32, 32, BS, WINDOW)
    a = seq(range(1, 25))  # 24 tokens: 6 blocks, prefilled in one go
    admit(kv, a)
    compute(kv, a, 24)
    assert kv.find_prefix(seq(range(1, 26))) == 6  # all sliding blocks still held by a
    kv.append_slots(a, 1)  # a moves on: its sliding blocks 0..3 go back to the pool
    a.token_ids.append(7)
    compute(kv, a, 1)
    kv.append_slots(a, 1)
    b = seq(range(1, 26))
    hit = admit(kv, b)
    assert hit == 6  # blocks 0..3 are not needed at position 24's window, 4..5 still are
    table = kv.table(b)
    assert table.sliding[:4] == [-1] * 4 and table.sliding[4:6] == kv.table(a).sliding[4:6]


def test_tables_belong_to_the_manager_not_the_sequence():
    kv = KVCacheManager(16, 16, BS, WINDOW)
    s = seq(range(1, 6))
    admit(kv, s)
    assert not hasattr(s, "block_table") and not hasattr(s, "sliding_table")
    with pytest.raises(AssertionError):
        kv.allocate(s, 0, 1)  # admitted twice without a free
    kv.free(s)
    with pytest.raises(KeyError):
        kv.free(s)  # freed twice


def test_equal_tokens_after_a_different_prefix_are_a_different_block():
    """A block's KV depends on every token before it: its name chains its predecessor's."""
    kv = KVCacheManager(32, 32, BS, WINDOW)
    a, b = seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), seq([10, 11, 12, 13, 5, 6, 7, 8, 9])
    for s in (a, b):
        admit(kv, s)
        compute(kv, s, s.num_tokens)
    d = seq([10, 11, 12, 13, 5, 6, 7, 8, 42])
    assert admit(kv, d) == 2
    assert kv.table(d).full[:2] == kv.table(b).full[:2] != kv.table(a).full[:2]
