"""Batched, vectorized sampling: one pass of tensor ops over the [S, V] logits of a step.

Legend: S sequences sampled this step, V vocab, P sequences with penalties.

Order (as vLLM): grammar mask of constrained rows (engine/structured.py) ->
raw logprobs (returned to users, from the model's own distribution; for a constrained
row, from the masked distribution: the only one it samples from) ->
penalties -> logit bias -> min_tokens mask -> greedy argmax | temperature -> top-k / top-p -> min-p ->
sample (see Sampler for the two equivalent draws). A seeded sequence draws its noise
from a generator seeded with hash(seed, sample index, output position), so its tokens
depend on nothing else in the batch, nor on preemption and recompute.
Every optional stage is skipped when no row of the batch uses it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch

from gptoss_ray.engine.structured import apply_token_bitmask
from gptoss_ray.sampling_params import LOGPROB_FLOOR, SamplingParams

_MASK64 = (1 << 64) - 1
PROMPT_LOGPROB_ROWS = 256  # prompt positions whose [rows, V] logits are held at once


@functools.lru_cache(maxsize=8)
def _block_width(v: int) -> int | None:
    """The divisor of v nearest 2048 within [64, 16384], or None (then argmax_rows falls back)."""
    widths = [w for w in range(64, min(v, 16384) + 1) if v % w == 0]
    return min(widths, key=lambda w: abs(w - 2048)) if widths else None


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(dim=-1) for x [S, V]: the same indices (the first maximum of each row).

    On a CPU, torch's argmax is a scalar loop (about 0.1 ms per row of the 201k vocab, 1.7 ms
    for 16 rows on one core) while amax is vectorized and ten times faster; so find the
    first block of each row that holds its maximum with amax, then argmax inside that block
    only. Ties and NaN resolve as argmax does: the first block whose amax is the row's
    maximum (or NaN) holds the first such element."""
    s, v = x.shape
    width = None if x.is_cuda or s == 0 else _block_width(v)
    if width is None or width == v:
        return x.argmax(dim=-1)
    blocks = x.reshape(s, v // width, width)
    which = blocks.amax(dim=-1).argmax(dim=-1)  # [S]
    inner = blocks[torch.arange(s, device=x.device), which].argmax(dim=-1)  # [S]
    return which * width + inner


def mix_seed(seed: int, sample_index: int, position: int) -> int:
    """splitmix64 of (seed, sample, position): a fresh, reproducible stream per token."""
    x = (seed * 0x9E3779B97F4A7C15 + sample_index * 0xD1B54A32D192ED03 + position) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


class SampledRow(Protocol):
    """What the sampler reads of each sequence it samples (the worker's SeqState): the
    sampler depends on this shape, not on the worker."""

    params: SamplingParams  # its derived flags (greedy, plain_sampling, has_penalty) included
    sample_index: int  # which of the request's n samples (mixed into a seeded row's seed)
    row: int  # the sequence's row in TokenHistory
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int

    @property
    def num_output_tokens(self) -> int: ...


@dataclass
class Penalties:
    rows: torch.Tensor  # [P] int64 rows of the batch with any penalty
    presence: torch.Tensor  # [P]
    frequency: torch.Tensor  # [P]
    repetition: torch.Tensor  # [P]
    output_ids: torch.Tensor  # [P, L] int64 output tokens, V elsewhere
    seen_ids: torch.Tensor  # [P, L] int64 prompt and output tokens, V elsewhere


@dataclass
class SamplingMetadata:
    """The per-row sampling settings of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [S] float32; 1.0 on greedy rows (unused there)
    greedy: torch.Tensor  # [S] bool
    all_greedy: bool
    top_k: torch.Tensor | None  # [S] int64, V = disabled; None when no row uses it
    top_p: torch.Tensor | None  # [S] float32; None when no row uses it
    min_p: torch.Tensor | None  # [S] float32; None when no row uses it
    seeds: list[tuple[int, int]]  # (row, derived seed) of seeded non-greedy rows
    banned: list[tuple[int, list[int]]]  # (row, stop token ids) of rows still under min_tokens
    penalties: Penalties | None
    num_logprobs: list[int | None] | None  # [S] top logprobs wanted per row (None = none); None if no row wants them
    # OpenAI's logit_bias of the rows that set one: [N] rows, [N] token ids, [N] biases; None if no row does
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # constrained rows: [C] row indices and their [C, W] token bitmasks; None if no row is constrained
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def argmax_only(self) -> bool:
        """Every row greedy and nothing else asked: the tokens are the argmax of the raw logits,
        exact in the model's dtype (upcasting is exact), so no [S, V] float32 copy is made."""
        return (self.all_greedy and self.num_logprobs is None and self.penalties is None
                and self.logit_bias is None and self.grammar is None)

    @classmethod
    def build(cls, states: list[SampledRow], vocab_size: int, eos_token_ids: list[int], device,
              history: TokenHistory | None = None,
              grammar: tuple[torch.Tensor, torch.Tensor] | None = None) -> SamplingMetadata:
        params = [s.params for s in states]
        greedy_list = [p.greedy for p in params]
        meta = cls(temperature=None, greedy=None, all_greedy=all(greedy_list), top_k=None, top_p=None, min_p=None,
                   seeds=[], banned=[], penalties=None, num_logprobs=None, grammar=grammar)
        if not meta.all_greedy:
            # 1.0 on greedy rows: their temperature is unused, and may be ~0
            meta.temperature = torch.tensor([1.0 if s.params.greedy else s.params.temperature for s in states]).to(
                device, non_blocking=True)
            meta.greedy = torch.tensor(greedy_list).to(device, non_blocking=True)
        if all([p.plain_sampling for p in params]):  # the common case: nothing but temperature / greedy
            return meta

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        if not meta.all_greedy:
            if any(p.top_k > 0 for p in params):  # clamped: a top_k beyond V keeps every token
                meta.top_k = column([min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size for p in params],
                                    torch.int64)
            if any(p.top_p < 1.0 for p in params):
                meta.top_p = column([p.top_p for p in params], torch.float32)
            if any(p.min_p > 0.0 for p in params):
                meta.min_p = column([p.min_p for p in params], torch.float32)
            meta.seeds = [(i, mix_seed(s.params.seed, s.sample_index, s.num_output_tokens))
                          for i, s in enumerate(states) if s.params.seed is not None and not s.params.greedy]
        for i, s in enumerate(states):
            # a grammar decides where a constrained turn ends; banning its only allowed token would leave none
            if s.num_output_tokens < s.params.min_tokens and s.params.grammar is None:
                stop_ids = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else list(eos_token_ids))
                meta.banned.append((i, stop_ids))
        meta.penalties = _build_penalties(states, history, device)
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
        if bias:
            rows, ids, values = zip(*bias)
            meta.logit_bias = (column(rows, torch.int64), column(ids, torch.int64), column(values, torch.float32))
        if any(p.logprobs is not None for p in params):
            meta.num_logprobs = [p.logprobs for p in params]
        return meta


class TokenHistory:
    """Every token of every sequence a worker holds, as one [R, L] tensor on the device
    (R block-table rows, L max_model_len), updated by one write per step, so penalties
    never rebuild their inputs from Python lists. Allocated when a first sequence with
    penalties arrives."""

    def __init__(self, num_rows: int, max_len: int, vocab_size: int, device):
        self.vocab_size = vocab_size
        self.tokens = torch.full((num_rows, max_len), vocab_size, dtype=torch.int32, device=device)  # [R, L]

    def set_row(self, row: int, token_ids: list[int]) -> None:
        self.tokens[row, : len(token_ids)] = torch.tensor(token_ids, dtype=torch.int32).to(self.tokens.device)

    def append(self, rows: list[int], positions: list[int], token_ids: list[int]) -> None:
        dev = self.tokens.device
        index = (torch.tensor(rows, device=dev), torch.tensor(positions, device=dev))
        self.tokens.index_put_(index, torch.tensor(token_ids, dtype=torch.int32, device=dev))

    def penalty_ids(self, rows: list[int], prompt_lens: list[int], lens: list[int]):
        """(output ids, prompt + output ids) [P, L], V outside each sequence's range."""
        dev = self.tokens.device
        width = max(lens)
        ids = self.tokens[torch.tensor(rows, device=dev), :width].long()  # [P, L]
        pos = torch.arange(width, device=dev).unsqueeze(0)
        end = torch.tensor(lens, device=dev).unsqueeze(1)
        start = torch.tensor(prompt_lens, device=dev).unsqueeze(1)
        seen = ids.masked_fill(pos >= end, self.vocab_size)
        return seen.masked_fill(pos < start, self.vocab_size), seen


def _build_penalties(states: list[SampledRow], history: TokenHistory | None, device) -> Penalties | None:
    rows = [i for i, s in enumerate(states) if s.params.has_penalty]
    if not rows:
        return None
    sel = [states[i] for i in rows]
    output_ids, seen_ids = history.penalty_ids(
        [s.row for s in sel], [s.num_prompt_tokens for s in sel], [len(s.token_ids) for s in sel])
    return Penalties(
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        presence=torch.tensor([s.params.presence_penalty for s in sel], device=device),
        frequency=torch.tensor([s.params.frequency_penalty for s in sel], device=device),
        repetition=torch.tensor([s.params.repetition_penalty for s in sel], device=device),
        output_ids=output_ids, seen_ids=seen_ids,
    )


@dataclass
class SamplerOutput:
    token_ids: list[int]  # [S] the sampled token per row
    logprobs: list[dict[int, float] | None]  # [S] token id -> raw logprob, for rows that asked


def logprob_entries(logprobs: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[dict[int, float]]:
    """Per row of log-probabilities [R, V]: {token id: logprob} of the row's token [R] and
    its ks[r] most likely tokens (the users' format of sampled and prompt logprobs alike)."""
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).clamp(min=LOGPROB_FLOOR).tolist()  # [R]
    k_max = max(ks, default=0)
    top_v, top_i = logprobs.topk(k_max, dim=-1) if k_max else (logprobs[:, :0], logprobs[:, :0].long())
    top_v, top_i = top_v.clamp(min=LOGPROB_FLOOR).tolist(), top_i.tolist()
    entries = []
    for j, (token, k) in enumerate(zip(tokens.tolist(), ks)):
        entry = dict(zip(top_i[j][:k], top_v[j][:k]))
        entry[token] = chosen[j]
        entries.append(entry)
    return entries


def prompt_logprobs(compute_logits, hidden: torch.Tensor, targets: torch.Tensor, k: int) -> list[dict[int, float]]:
    """Logprobs of the prompt tokens `targets` [R] from the hidden states of the positions
    before them [R, H], from the model's raw distribution (no temperature or penalties,
    as vLLM's prompt_logprobs), PROMPT_LOGPROB_ROWS rows at a time so a long prompt never
    holds its whole [R, V] logits."""
    entries: list[dict[int, float]] = []
    for i in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        logits = compute_logits(hidden[i : i + PROMPT_LOGPROB_ROWS]).float()  # [r, V]
        rows = targets[i : i + PROMPT_LOGPROB_ROWS]
        entries += logprob_entries(torch.log_softmax(logits, dim=-1), rows, [k] * len(rows))
    return entries


class Sampler:
    """`method` "exponential" draws argmax(probs / q), q ~ Exp(1): no synchronization and
    one kernel, the GPU default. "inverse_cdf" draws one uniform per row and searches the
    cumulative probabilities: ten times cheaper on a CPU, where drawing V exponentials per
    row dominates. Same distribution either way."""

    def __init__(self, device, seed: int | None = None, method: str | None = None):
        self.device = torch.device(device)
        self.method = method or ("exponential" if self.device.type == "cuda" else "inverse_cdf")
        self.generator = torch.Generator(device=self.device)  # for unseeded requests
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._seeded = torch.Generator(device=self.device)  # re-seeded per seeded row

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits [S, V] in the model's dtype or float32; everything past a plain argmax runs in float32."""
        if not meta.argmax_only:
            logits = logits.float()
        if meta.grammar is not None:
            logits = apply_token_bitmask(logits, *meta.grammar)
        want_lp = [i for i, k in enumerate(meta.num_logprobs or ()) if k is not None]
        raw_lp = torch.log_softmax(logits[want_lp], dim=-1) if want_lp else None  # [L, V]
        if meta.penalties is not None:
            logits = _apply_penalties(logits, meta.penalties)
        if meta.logit_bias is not None:
            rows, ids, values = meta.logit_bias
            logits = logits.index_put((rows, ids), values, accumulate=True)  # out of place: raw logits stay
        for row, stop_ids in meta.banned:
            logits[row, stop_ids] = float("-inf")
        tokens = argmax_rows(logits) if meta.all_greedy else self._sample(logits, meta)  # [S]
        token_list = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(token_list)
        if raw_lp is not None:
            rows = torch.tensor(want_lp, device=logits.device)
            entries = logprob_entries(raw_lp, tokens[rows], [meta.num_logprobs[i] for i in want_lp])
            for row, entry in zip(want_lp, entries):
                logprobs[row] = entry
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy_tokens = argmax_rows(logits)  # [S]
        logits = logits / meta.temperature.unsqueeze(1)
        if meta.top_k is not None or meta.top_p is not None:
            logits = _apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = torch.softmax(logits, dim=-1)  # [S, V]
        if meta.min_p is not None:
            threshold = meta.min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        sampled = self._exponential(probs, meta) if self.method == "exponential" else self._inverse_cdf(probs, meta)
        return torch.where(meta.greedy, greedy_tokens, sampled)

    def _exponential(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        q = torch.empty_like(probs).exponential_(generator=self.generator)  # [S, V]
        for row, seed in meta.seeds:
            self._seeded.manual_seed(seed)
            q[row].exponential_(generator=self._seeded)
        return argmax_rows(probs / q)

    def _inverse_cdf(self, probs: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        cdf = probs.cumsum(dim=-1)  # [S, V], unnormalized after min-p
        u = torch.rand(probs.shape[0], 1, generator=self.generator, device=probs.device)  # [S, 1]
        for row, seed in meta.seeds:
            self._seeded.manual_seed(seed)
            u[row] = torch.rand(1, generator=self._seeded, device=probs.device)
        total = cdf[:, -1:]
        # strictly below the total, so some token's cdf exceeds it; right=True never picks p = 0
        u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    v = logits.shape[1]
    sub = logits[p.rows]  # [P, V]
    counts = torch.zeros(sub.shape[0], v + 1, device=sub.device)
    counts.scatter_add_(1, p.output_ids, torch.ones_like(p.output_ids, dtype=counts.dtype))
    counts = counts[:, :v]  # [P, V] occurrences in the output
    seen = torch.zeros(sub.shape[0], v + 1, dtype=torch.bool, device=sub.device)
    seen = seen.scatter_(1, p.seen_ids, True)[:, :v]  # [P, V] in prompt or output
    # CTRL's repetition penalty: shrink positive logits, push negative ones further down.
    rep = p.repetition.unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    # OpenAI's presence / frequency penalties act on output tokens only.
    sub = sub - p.frequency.unsqueeze(1) * counts - p.presence.unsqueeze(1) * (counts > 0)
    logits = logits.clone()
    logits[p.rows] = sub
    return logits


# top-k / top-p look at this many most likely tokens per row first, then at more for the
# rows that need them: topk(64) costs a fifth of topk(1024) on a CPU, and peaked rows
# (the usual case) are settled by it.
TOP_CANDIDATE_STAGES = (64, 1024)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (-inf) each row's tokens outside its top-k, then outside the top-p nucleus of
    what is left. Works on each row's most likely tokens (a top-k, not a sort of the
    vocabulary), which is exact whenever the kept set provably ends among them; rows not
    settled by the last stage fall back to a full sort."""
    s, v = logits.shape
    dev = logits.device
    k = top_k if top_k is not None else torch.full((s,), v, dtype=torch.int64, device=dev)  # [S]
    p = top_p if top_p is not None else torch.ones(s, device=dev)  # [S]
    todo = (k < v) | (p < 1.0)  # [S]: rows that use neither keep their logits
    out = logits
    # a top-k alone beyond the last stage is never settled by candidates: its threshold is a
    # selection (no stage's topk first, no sort)
    only_k = todo & (k > TOP_CANDIDATE_STAGES[-1]) & (p >= 1.0)
    if bool(only_k.any()):
        rows = only_k.nonzero().squeeze(1)
        out = logits.clone()
        out[rows] = _kth_top_k(logits[rows], k[rows])
        todo &= ~only_k
    for cand in TOP_CANDIDATE_STAGES:
        if not bool(todo.any()):
            return out
        rows = todo.nonzero().squeeze(1)
        every_row = len(rows) == s  # the usual case: no [S, V] gathers and scatters
        masked, exact = _top_k_top_p_candidates(logits if every_row else logits[rows], k[rows], p[rows],
                                                min(v, cand))
        if every_row and bool(exact.all()):
            return masked
        out = logits.clone() if out is logits else out
        out[rows[exact]] = masked[exact]
        todo[rows[exact]] = False
    if bool(todo.any()):
        rows = todo.nonzero().squeeze(1)
        out = logits.clone() if out is logits else out
        out[rows] = _sort_top_k_top_p(logits[rows], k[rows], p[rows])
    return out


def _kth_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Top-k alone for k beyond the candidates: mask below each row's k-th largest value,
    found by selection (kthvalue, O(V) per row) instead of a sort of the vocabulary (O(V log V),
    six times slower on a CPU: a `top_k` of 10^5 once cost every step of the batch 35 ms per
    such row). The same mask as the sort, ties at the k-th value kept. One kthvalue per
    distinct k (a batch holds few)."""
    v = logits.shape[1]
    kth = torch.empty(logits.shape[0], 1, dtype=logits.dtype, device=logits.device)
    for k in top_k.unique().tolist():
        rows = (top_k == k).nonzero().squeeze(1)
        kth[rows] = logits[rows].kthvalue(v - min(k, v) + 1, dim=-1, keepdim=True).values
    return logits.masked_fill(logits < kth, float("-inf"))


def _top_k_top_p_candidates(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor, cand: int):
    """The masks from the `cand` most likely tokens of each row -> (masked logits [R, V],
    exact [R]): a row is exact when its kept set provably ends among the candidates, that
    is always for k <= cand, and for top-p alone when the candidates hold >= p of the mass."""
    v = logits.shape[1]
    vals, idx = logits.topk(cand, dim=-1)  # [R, C] descending
    in_k = torch.arange(cand, device=logits.device).unsqueeze(0) < k.unsqueeze(1)  # [R, C]
    # log-normalizer of each row's top-k set: over the candidates if the set fits in them
    lse = torch.logsumexp(vals.masked_fill(~in_k, float("-inf")), dim=-1)  # [R]
    if bool((k > cand).any()):  # the whole row's normalizer, only where a row needs it (a pass over [R, V])
        lse = torch.where(k <= cand, lse, torch.logsumexp(logits, dim=-1))
    probs = (vals - lse.unsqueeze(1)).exp().masked_fill(~in_k, 0.0)  # [R, C]
    keep = in_k & (probs.cumsum(dim=-1) - probs < p.unsqueeze(1))  # mass before the token < p
    keep[:, 0] = True  # the most likely token always survives
    out = torch.full_like(logits, float("-inf")).scatter_(1, idx, vals.masked_fill(~keep, float("-inf")))
    exact = (k <= cand) | ((k >= v) & (probs.sum(dim=-1) >= p))
    return out, exact


def _sort_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same masks by sorting the whole vocabulary (O(V log V) per row)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    v = logits.shape[1]
    kth = sorted_logits.gather(1, (v - top_k.clamp(max=v)).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1.0 - top_p.unsqueeze(1)  # the low tail holding 1 - p of the mass
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
