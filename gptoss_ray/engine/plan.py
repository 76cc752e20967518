"""What the engine sends its workers each step, and what comes back.

These cross a process boundary (Ray actors when ep_size > 1), so they are plain typed
dataclasses. Only the diff is sent (as in vLLM's SchedulerOutput): a worker keeps a mirror
of each sequence it holds (tokens, block table, sampling params), so per step it needs
just the new sequences, the ids and token counts of the ones computed this step, the
block-table entries that changed, and the ids to forget. A decode step of 256 sequences
is therefore a few lists of 256 ints, never prompts or logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_ray.config import FULL_ATTENTION as FULL
from gptoss_ray.config import SLIDING_ATTENTION as SLIDING
from gptoss_ray.sampling_params import SamplingParams


@dataclass
class NewSequence:
    """A sequence a worker has not seen yet (a new request, an n>1 sample, or a sequence
    resuming after preemption, which is recomputed from its tokens)."""

    seq_id: int  # engine-wide unique id
    token_ids: list[int]  # every token known now: the prompt, then any output before preemption
    num_prompt_tokens: int  # penalties treat prompt and output tokens differently
    num_computed_tokens: int  # tokens whose KV is already in the cache (prefix-cache hit)
    params: SamplingParams  # how to sample this sequence
    sample_index: int = 0  # which of the request's n samples; mixed into a seeded request's seed


@dataclass
class BlockTableUpdates:
    """Entries of the workers' block tables that changed this step, as parallel lists:
    table[layer_kind][seq_ids[i]][cols[i]] = blocks[i]. A block of -1 marks a
    sliding-window block that left the window and was recycled."""

    seq_ids: list[int] = field(default_factory=list)  # whose table
    cols: list[int] = field(default_factory=list)  # logical block index (position // block_size)
    blocks: list[int] = field(default_factory=list)  # physical block id, or -1 = freed


@dataclass
class RankPlan:
    """One worker rank's share of a step. A rank with nothing to do still runs the step
    (every rank must meet at each expert all-to-all)."""

    new_seqs: list[NewSequence] = field(default_factory=list)  # added before this step's compute
    seq_ids: list[int] = field(default_factory=list)  # sequences computed this step, in batch order
    num_new_tokens: list[int] = field(default_factory=list)  # tokens each computes (1 = decode)
    finished_ids: list[int] = field(default_factory=list)  # forget these first (done, aborted, preempted)
    # block-table changes per layer kind (FULL, SLIDING), applied after new_seqs
    table_updates: dict[str, BlockTableUpdates] = field(
        default_factory=lambda: {FULL: BlockTableUpdates(), SLIDING: BlockTableUpdates()}
    )

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass
class StepPlan:
    """The whole step, one RankPlan per worker rank. Sent once (ray.put) to every rank;
    each worker reads `ranks[its rank]`."""

    step_id: int  # increasing; for logs and for matching results to plans
    ranks: list[RankPlan]  # index = worker rank
    report_expert_load: bool = False  # workers attach their per-layer expert counts

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.ranks)


@dataclass
class PromptLogprobs:
    """Logprobs of some prompt tokens of one sequence, computed in this step's prefill chunk:
    entry i is prompt token `start + i` given the tokens before it (start >= 1)."""

    seq_id: int
    start: int
    logprobs: list[dict[int, float]]  # token id -> logprob: the prompt token plus the top ones


@dataclass
class StepResult:
    """One rank's sampled tokens. A sequence whose prefill chunk did not reach the end of
    its known tokens is computed but not sampled, so it is absent here."""

    seq_ids: list[int] = field(default_factory=list)  # sampled sequences, in batch order
    token_ids: list[int] = field(default_factory=list)  # the token sampled for each
    # per sampled sequence: None unless it asked for logprobs, else token id -> logprob
    # (the sampled token plus its `logprobs` most likely ones), from the raw model distribution
    logprobs: list[dict[int, float] | None] = field(default_factory=list)
    expert_load: list[list[int]] | None = None  # [layer][expert] routed-token counts when asked
    # for sequences that asked for prompt logprobs and computed prompt positions this step,
    # sampled or not (a prefill chunk that did not reach the end is not in seq_ids)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)
