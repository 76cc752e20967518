"""Which sequences compute how many tokens this step, on which rank.

Policy (first come, first served, as vLLM v1):
1. Running sequences, oldest first, each takes what it still needs (1 token for a decode,
   up to the rest of the budget for a prompt chunk) from `max_num_batched_tokens`. So a
   long prompt is prefilled in chunks that share steps with the running decodes instead
   of stalling them for its whole prefill.
2. When a rank's pool cannot hold a running sequence's next tokens, the newest running
   sequence on that rank is preempted by recompute: its blocks are freed and it goes
   back to the head of the queue, later recomputing prompt + output so far. Sampling
   depends only on (tokens, seed, position), so its output is unchanged.
3. If nothing was preempted, waiting sequences are admitted in order while a rank has
   blocks for them (no skipping ahead: a big request is not starved by small ones).
   Each is placed on the rank with the longest prefix-cache hit, then the least KV usage.
"""

from __future__ import annotations

import logging
from collections import deque

from gptoss_ray.engine.kv_cache import KVCacheManager
from gptoss_ray.engine.plan import NewSequence, RankPlan, StepPlan
from gptoss_ray.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, kv: list[KVCacheManager], max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True):
        self.kv = kv  # one block manager per worker rank
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_caching = enable_prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; the newest is preempted first
        self.num_preemptions = 0
        self._finished_ids: list[list[int]] = [[] for _ in kv]  # per rank, for the next plan
        self._step_id = 0

    @property
    def num_ranks(self) -> int:
        return len(self.kv)

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence now (finished or aborted), freeing its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def forget_workers(self) -> None:
        """The workers were replaced: they hold no sequences, so there is nothing to tell them."""
        self._finished_ids = [[] for _ in self.kv]
        for seq in self.waiting:
            seq.on_worker = False

    def _release(self, seq: Sequence) -> None:
        self.kv[seq.rank].free(seq)
        if seq.on_worker:
            self._finished_ids[seq.rank].append(seq.seq_id)
            seq.on_worker = False
        seq.num_computed_tokens = 0
        seq.rank = -1

    def _preempt(self, victim: Sequence) -> None:
        self.running.remove(victim)
        self._release(victim)
        self.add(victim, front=True)
        self.num_preemptions += 1
        logger.debug("preempted %s (sample %d), %d tokens to recompute",
                     victim.request_id, victim.index, victim.num_tokens)

    # --- the step ----------------------------------------------------------------------------

    def schedule(self) -> tuple[StepPlan, list[tuple[Sequence, int]]]:
        """The next step's plan, and each sequence it computes with its number of new tokens."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i, running, kv = 0, self.running, self.kv
        while i < len(running) and budget > 0:
            seq = running[i]
            n = len(seq.token_ids) - seq.num_computed_tokens  # 1 for a decode
            if n > budget:
                n = budget
            computed = seq.num_computed_tokens
            # append_slots would change nothing while the tokens fit (kv_cache.py sets the bounds):
            # most decode steps, block_size - 1 in block_size, skip the call
            fits = computed + n <= seq.kv_room and computed < seq.kv_recycle_at
            while not fits and not kv[seq.rank].append_slots(seq, n):
                victim = next(s for s in reversed(self.running) if s.rank == seq.rank)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, n))
                budget -= n
                i += 1
        if not preempted:
            budget = self._admit(budget, scheduled)
        return self._build_plan(scheduled), scheduled

    def _admit(self, budget: int, scheduled: list[tuple[Sequence, int]]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            placed = self._place(seq, budget)
            if placed is None:
                break
            rank, hit, n = placed
            self.waiting.popleft()
            seq.rank = rank
            kv = self.kv[rank]
            first_admission = not seq.admitted_once
            kv.allocate(seq, hit, n)
            if first_admission and self._use_cache(seq):
                kv.num_query_tokens += seq.num_prompt_tokens
                kv.num_hit_tokens += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return budget

    def _use_cache(self, seq: Sequence) -> bool:
        # A prompt whose logprobs are asked for computes every position (as vLLM v1), until
        # its first output token shows they all were.
        if seq.params.prompt_logprobs is not None and seq.index == 0 and seq.num_output_tokens == 0:
            return False
        # Samples 1..n-1 and resumed sequences always reuse blocks: their KV is exactly
        # what recomputing would produce, so this is safe with prefix caching off.
        return self.enable_prefix_caching or seq.index > 0 or seq.admitted_once

    def _place(self, seq: Sequence, budget: int) -> tuple[int, int, int] | None:
        """(rank, cached prefix blocks, tokens to compute now) on the rank with the longest
        prefix hit, then the least KV usage, among those with room; None if none has."""
        ranks = range(self.num_ranks)
        if seq.index > 0 and seq.rank_hint >= 0:
            ranks = [seq.rank_hint]  # n>1 samples stay beside sample 0's prompt blocks
        options = []
        for r in ranks:
            hit = self.kv[r].find_prefix(seq) if self._use_cache(seq) else 0
            options.append((-hit, self.kv[r].usage, r, hit))
        for _, _, r, hit in sorted(options):
            n = min(seq.num_tokens - hit * self.kv[r].block_size, budget)
            if self.kv[r].can_allocate(seq, hit, n):
                return r, hit, n
        return None

    def _build_plan(self, scheduled: list[tuple[Sequence, int]]) -> StepPlan:
        ranks = [RankPlan() for _ in self.kv]
        for seq, n in scheduled:
            if not seq.on_worker:
                seq.on_worker = True
                ranks[seq.rank].new_seqs.append(NewSequence(
                    seq_id=seq.seq_id, token_ids=list(seq.token_ids), num_prompt_tokens=seq.num_prompt_tokens,
                    num_computed_tokens=seq.num_computed_tokens, params=seq.params, sample_index=seq.index,
                ))
        if len(ranks) == 1:  # one rank (no expert parallelism): each column in one pass
            ranks[0].seq_ids = [seq.seq_id for seq, _ in scheduled]
            ranks[0].num_new_tokens = [n for _, n in scheduled]
        else:
            for seq, n in scheduled:
                ranks[seq.rank].seq_ids.append(seq.seq_id)
                ranks[seq.rank].num_new_tokens.append(n)
        for r, plan in enumerate(ranks):
            plan.finished_ids, self._finished_ids[r] = self._finished_ids[r], []
            plan.table_updates = self.kv[r].drain_updates()
        self._step_id += 1
        return StepPlan(step_id=self._step_id, ranks=ranks)
