"""KV block bookkeeping for one worker rank: which physical blocks each sequence holds.

Two pools, because the two layer kinds need different amounts of memory:
- full-attention layers keep every block of a sequence;
- sliding-window layers (every other gpt-oss layer, window 128) only ever read the last
  `window` positions, so a sequence's sliding blocks wholly behind its window go back to
  the pool. Long sequences are thus dominated by the full layers (36 KiB/token for 120b).

Prefix caching (as in vLLM): a full block is named by hash(previous block's hash, its
tokens), so equal names mean equal KV. Freed blocks keep their name and stay findable
until the pool reuses them (least recently freed first). A hit needs the full blocks of
the prefix and the sliding blocks inside the window at the prefix's end; at least one
prompt token is always recomputed so the sequence gets logits to sample from.

The manager owns each admitted sequence's `BlockTable` (keyed by seq_id, dropped by
`free`): sequences carry their tokens and prefix hashes, never physical block ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from gptoss_ray.engine.plan import FULL, SLIDING, BlockTableUpdates
from gptoss_ray.engine.sequence import Sequence


class BlockPool:
    """Physical blocks of one layer kind: ref counts, a free list in LRU order, and the
    prefix cache (hash -> block) over blocks that hold a full, named block of tokens."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict its old contents from the prefix cache
            if self.cached.get(h) == block:
                del self.cached[h]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """Take another reference to a cached block (a prefix hit)."""
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None  # most recently freed = evicted last

    def register(self, block: int, block_hash: int) -> None:
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def reset_cache(self) -> None:
        """Forget every named block (their contents are gone); ref counts are unchanged."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks


@dataclass(eq=False, slots=True)  # read per sequence per step: no instance dict
class BlockTable:
    """One sequence's blocks on one rank: physical block id per logical block (position //
    block_size), one list per layer kind, and how far recycling and prefix naming got."""

    full: list[int] = field(default_factory=list)
    sliding: list[int] = field(default_factory=list)  # -1 for blocks recycled behind the window
    num_sliding_freed: int = 0  # leading `sliding` entries already recycled (-1)
    num_registered: int = 0  # leading `full` blocks already named in the prefix cache


class KVCacheManager:
    """Per-rank block manager. Owns the block table of every sequence admitted on its rank
    and records every changed table entry in `updates` for the next StepPlan."""

    def __init__(
        self, num_blocks: int, num_sliding_blocks: int, block_size: int, sliding_window: int | None
    ):
        self.block_size = block_size
        self.full = BlockPool(num_blocks)
        # No sliding pool when the model has no sliding layers (window None).
        self.window = sliding_window if num_sliding_blocks > 0 else None
        self.sliding = BlockPool(num_sliding_blocks) if self.window else None
        self.updates = {FULL: BlockTableUpdates(), SLIDING: BlockTableUpdates()}
        self.tables: dict[int, BlockTable] = {}  # seq_id -> its blocks, from allocate() to free()
        self.num_hit_tokens = 0  # prefix-cache hits, in tokens
        self.num_query_tokens = 0  # prompt tokens looked up in the prefix cache

    # --- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self.full.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.full.num_free / self.full.num_blocks

    def table(self, seq: Sequence) -> BlockTable:
        return self.tables[seq.seq_id]

    def reset_prefix_cache(self) -> None:
        for pool in (self.full, self.sliding):
            if pool is not None:
                pool.reset_cache()

    def drain_updates(self) -> dict[str, BlockTableUpdates]:
        out, self.updates = self.updates, {FULL: BlockTableUpdates(), SLIDING: BlockTableUpdates()}
        return out

    def _first_needed_block(self, position: int) -> int:
        """First sliding block a query at `position` (or later) can read: key j is seen
        by query i when i - j < window."""
        return max(0, position - self.window + 1) // self.block_size

    def _ensure_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs, hashes, tokens = self.block_size, seq.block_hashes, seq.token_ids
        for b in range(len(hashes), num_blocks):
            prev = hashes[b - 1] if b else 0
            hashes.append(hash((prev, *tokens[b * bs : (b + 1) * bs])))

    def find_prefix(self, seq: Sequence) -> int:
        """Number of leading blocks of `seq` whose KV is cached on this rank (taken by
        `allocate`). Leaves at least one token to compute."""
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._ensure_hashes(seq, max_blocks)
        n = 0
        while n < max_blocks and self.full.lookup(seq.block_hashes[n]) is not None:
            n += 1
        if self.sliding is None or n == 0:
            return n
        # The sliding layers need their blocks inside the window at the prefix's end;
        # `run[k]` = how many consecutive blocks ending at k are cached in the sliding pool.
        run, length = [], 0
        for b in range(n):
            length = length + 1 if self.sliding.lookup(seq.block_hashes[b]) is not None else 0
            run.append(length)
        for k in range(n, 0, -1):
            if run[k - 1] >= k - self._first_needed_block(k * self.block_size):
                return k
        return 0

    def _num_new_blocks(self, table_len: int, num_tokens_after: int) -> int:
        return max(0, -(-num_tokens_after // self.block_size) - table_len)

    def can_allocate(self, seq: Sequence, num_hit_blocks: int, num_new_tokens: int) -> bool:
        """Whether admitting `seq` with that prefix hit and computing `num_new_tokens` fits."""
        end = num_hit_blocks * self.block_size + num_new_tokens
        hits = [self.full.lookup(h) for h in seq.block_hashes[:num_hit_blocks]]
        revived = sum(self.full.ref_counts[b] == 0 for b in hits)
        if self._num_new_blocks(num_hit_blocks, end) + revived > self.full.num_free:
            return False
        if self.sliding is None:
            return True
        first = self._first_needed_block(num_hit_blocks * self.block_size)
        hits = [self.sliding.lookup(h) for h in seq.block_hashes[first:num_hit_blocks]]
        revived = sum(self.sliding.ref_counts[b] == 0 for b in hits)
        return self._num_new_blocks(num_hit_blocks, end) + revived <= self.sliding.num_free

    # --- changes ---------------------------------------------------------------------------

    def _set(self, kind: str, seq_id: int, table: BlockTable, col: int, block: int) -> None:
        blocks = table.full if kind == FULL else table.sliding
        if col == len(blocks):
            blocks.append(block)
        else:
            blocks[col] = block
        u = self.updates[kind]
        u.seq_ids.append(seq_id)
        u.cols.append(col)
        u.blocks.append(block)

    def allocate(self, seq: Sequence, num_hit_blocks: int, num_new_tokens: int) -> None:
        """Admit `seq`: take its cached prefix blocks, then blocks for `num_new_tokens`.
        The caller checked `can_allocate`."""
        assert seq.seq_id not in self.tables, "allocate() of a sequence that holds blocks"
        sid, table = seq.seq_id, BlockTable(num_registered=num_hit_blocks)
        self.tables[sid] = table
        for col in range(num_hit_blocks):
            block = self.full.lookup(seq.block_hashes[col])
            self.full.acquire(block)
            self._set(FULL, sid, table, col, block)
        if self.sliding is not None:
            first = self._first_needed_block(num_hit_blocks * self.block_size)
            for col in range(num_hit_blocks):
                block = -1
                if col >= first:
                    block = self.sliding.lookup(seq.block_hashes[col])
                    self.sliding.acquire(block)
                self._set(SLIDING, sid, table, col, block)
            table.num_sliding_freed = min(first, num_hit_blocks)
        seq.num_computed_tokens = num_hit_blocks * self.block_size
        if not seq.admitted_once:
            seq.admitted_once = True
            seq.num_cached_tokens = seq.num_computed_tokens
        ok = self.append_slots(seq, num_new_tokens)
        assert ok, "allocate() called without can_allocate()"

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Blocks for the next `num_new_tokens` of a running sequence. Sliding blocks that
        fell behind the window are recycled first. False (nothing taken) if the pool is short.
        Called for every running sequence every step: the common case returns early."""
        sid, computed, bs = seq.seq_id, seq.num_computed_tokens, self.block_size
        table = self.tables[sid]
        if self.sliding is not None:
            first = (computed - self.window + 1) // bs
            if first > table.num_sliding_freed:
                self._recycle_sliding(sid, table, min(first, len(table.sliding)))
        need = -(-(computed + num_new_tokens) // bs) - len(table.full)
        if need > 0:
            if need > self.full.num_free or (self.sliding is not None and need > self.sliding.num_free):
                return False
            for _ in range(need):
                self._set(FULL, sid, table, len(table.full), self.full.allocate())
                if self.sliding is not None:
                    self._set(SLIDING, sid, table, len(table.sliding), self.sliding.allocate())
        # Until these change, a call would neither allocate (the tokens fit the named blocks)
        # nor recycle (first <= num_sliding_freed above): the scheduler's skip (Sequence.kv_room).
        seq.kv_room = len(table.full) * bs
        seq.kv_recycle_at = ((table.num_sliding_freed + 1) * bs + self.window - 1 if self.sliding is not None
                             else 1 << 62)
        return True

    def _recycle_sliding(self, seq_id: int, table: BlockTable, upto: int) -> None:
        for col in range(upto - 1, table.num_sliding_freed - 1, -1):  # deepest first, as free() does
            self.sliding.release(table.sliding[col])
            self._set(SLIDING, seq_id, table, col, -1)
        table.num_sliding_freed = upto

    def register_computed(self, seq: Sequence, num_full: int) -> None:
        """Name the blocks filled so far (the first `num_full`), so later requests can hit
        them; called every step, so it returns at once when no block filled up."""
        table = self.tables[seq.seq_id]
        if num_full <= table.num_registered:
            return
        self._ensure_hashes(seq, num_full)
        for col in range(table.num_registered, num_full):
            self.full.register(table.full[col], seq.block_hashes[col])
            if self.sliding is not None and table.sliding[col] >= 0:
                self.sliding.register(table.sliding[col], seq.block_hashes[col])
        table.num_registered = num_full

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks, deepest first: the free list evicts from its front, and
        deep blocks are the least likely to be shared again. The table goes with them."""
        table = self.tables.pop(seq.seq_id)
        seq.kv_room = seq.kv_recycle_at = 0  # the next append_slots is on a new table: no skip
        for block in reversed(table.full):
            self.full.release(block)
        if self.sliding is not None:
            for block in reversed(table.sliding):
                if block >= 0:
                    self.sliding.release(block)


def sliding_blocks_needed(window: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Sliding-pool size that never runs short: in one step a sequence computing n tokens
    from position p holds blocks from (p - window + 1) // bs to (p + n - 1) // bs, at most
    (n + window - 2) / bs + 2 of them; summed over the step's sequences (sum n <= budget)."""
    per_seq = -(-(window - 2) // block_size) + 2
    return max_num_seqs * per_seq + -(-max_num_batched_tokens // block_size)


def plan_num_blocks(
    memory_bytes: int, full_block_bytes: int, sliding_block_bytes: int, sliding_needed: int
) -> tuple[int, int]:
    """(full, sliding) block counts filling `memory_bytes`: the sliding pool gets what it can
    use (never more blocks than the full pool, since each sliding block shadows a full one),
    the full pool the rest."""
    if sliding_block_bytes == 0:
        return memory_bytes // full_block_bytes, 0
    full = (memory_bytes - sliding_needed * sliding_block_bytes) // full_block_bytes
    if full >= sliding_needed:
        return full, sliding_needed
    both = memory_bytes // (full_block_bytes + sliding_block_bytes)
    return both, both
