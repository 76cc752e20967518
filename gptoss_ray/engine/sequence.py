"""A sequence: one sample of one request, as the engine tracks it.

A request with n > 1 becomes n sequences. Sample 0 prefills the prompt; samples 1..n-1
are created once that prefill is done and reuse its full KV blocks through the prefix
cache (each recomputes at most the prompt's last partial block, so it samples its own
first token from its own logits).
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from gptoss_ray.sampling_params import SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds KV blocks on `rank`, scheduled every step it fits the budget
    FINISHED = "finished"


@dataclass(eq=False, slots=True)  # slots: read per step per sequence, fewer cache lines than a __dict__
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt then output; output tokens survive preemption
    num_prompt_tokens: int
    params: SamplingParams
    index: int = 0  # which of the request's n samples
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache on `rank`
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    rank: int = -1  # worker rank holding the KV; -1 while waiting
    rank_hint: int = -1  # n>1 samples: sample 0's rank, where the prompt blocks are cached
    on_worker: bool = False  # the rank's worker has this sequence's mirror
    admitted_once: bool = False  # counts the prefix-cache query once per sequence
    # Its blocks are in the BlockTable its rank's KVCacheManager holds (kv_cache.py); the
    # prefix hashes name its tokens, whichever rank it lands on.
    block_hashes: list[int] = field(default_factory=list)  # hash of each full block of token_ids
    # Precomputed for the per-token fast path: tokens that may end the sequence (stop ids,
    # EOS unless ignored) and the output length at which it ends.
    stop_ids: frozenset[int] = frozenset()
    max_output_tokens: int = 1 << 62
    # Set by its rank's KVCacheManager.append_slots: while num_computed_tokens + new tokens
    # <= kv_room and num_computed_tokens < kv_recycle_at, append_slots would change nothing,
    # so the scheduler skips the call (most decode steps). 0 (free, new) forces the call.
    kv_room: int = 0
    kv_recycle_at: int = 0
    spawn_pending: bool = False  # sample 0 of an n>1 request whose other samples wait for its prefill
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None

    @property
    def fast_path(self) -> bool:
        """No logprobs or pending samples: only stop_ids / length can end it."""
        return self.params.plain_output and not self.spawn_pending

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens


@dataclass(eq=False)
class Request:
    """A user request: its samples and what the caller is waiting on."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_output_tokens: int  # params.max_tokens, or the rest of the context (check_context)
    seqs: list[Sequence] = field(default_factory=list)
    children_spawned: bool = False  # samples 1..n-1 exist
    # prompt_logprobs asked for: one entry per prompt token (None for the first), filled by
    # sample 0's prefill chunks, sent with each sample's first delta
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def is_finished(self) -> bool:
        return self.children_spawned and all(s.is_finished for s in self.seqs)
