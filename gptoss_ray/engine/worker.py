"""A worker: one rank's model, KV cache tensors and sampler, driven one StepPlan at a time.

It keeps a mirror of each sequence placed on its rank (tokens, block tables, sampling
params) so each step only carries the diff (see plan.py). Runs in-process for ep_size=1
(InProcessExecutor); for ep_size > 1 the RayExecutor builds one per Ray actor, each
holding only its rank's `experts` (the actor installs the all-to-all dispatcher).
Every step runs the model, with zero tokens if none are on this rank: an expert-parallel
rank then still joins each MoE layer's all-to-all, and no caller needs a special case.

Legend: T tokens of the step, B sequences computed, S sequences sampled, MB blocks per
sequence, R rows of the block-table tensors (= max_num_seqs).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from gptoss_ray.engine.host_memory import huge_pages_requested, keep_large_allocations
from gptoss_ray.engine.plan import FULL, SLIDING, BlockTableUpdates, NewSequence, PromptLogprobs, StepPlan, StepResult
from gptoss_ray.engine.sampler import Sampler, SamplingMetadata, TokenHistory, prompt_logprobs
from gptoss_ray.engine.structured import GrammarMasks, GrammarState
from gptoss_ray.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to build itself (sent to Ray actors, so plain values)."""

    model_path: str  # local checkpoint directory (already located / downloaded)
    dtype: str  # "float32" | "bfloat16": weights, activations and KV
    device: str  # "cpu" | "cuda"
    block_size: int  # tokens per KV block
    num_blocks: int  # blocks of the full-attention pool
    num_sliding_blocks: int  # blocks of the sliding-window pool (0 if the model has no sliding layers)
    max_num_seqs: int  # rows of the block-table tensors: sequences a rank can hold at once
    max_model_len: int  # longest sequence: columns of the block tables
    ep_size: int = 1  # expert-parallel ranks (Ray actors when > 1)
    eos_token_ids: tuple[int, ...] = ()  # masked while a sequence is under min_tokens
    seed: int | None = None  # unseeded sampling's generator; None = from the OS
    dequantize_experts: bool | None = None  # unpack MXFP4 experts at load; None = auto (see EngineConfig)
    enforce_eager: bool = False  # no CUDA graphs
    static_decode: bool | None = None  # the static decode runner; None = auto (see EngineConfig.static_decode)
    graph_sizes: tuple[int, ...] | None = None  # decode buckets; None = decode_runner.default_buckets


def should_dequantize(choice: bool | None, device: torch.device, model) -> bool:
    """EngineConfig.dequantize_experts: an explicit choice stands; auto unpacks where the
    torch reference runs the experts (CPU, unless GPTOSS_KERNELS forces Triton) and the
    unpacked experts fit in a quarter of the memory available now."""
    from gptoss_kernels.ops import use_triton

    if choice is not None:
        return choice
    if device.type != "cpu" or use_triton(torch.empty(0, device=device)):
        return False
    packed = [m.experts.gate_up_blocks.numel() + m.experts.down_blocks.numel()  # 2 weights per byte
              for m in model.moe_layers() if hasattr(m.experts, "gate_up_blocks")]
    if not packed:
        return False
    unpacked_bytes = 2 * sum(packed) * 4  # float32: LocalExperts.dequantize_ where the reference runs
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: stay packed
        return False
    return unpacked_bytes <= available // 4


@dataclass(eq=False, slots=True)  # read per step per sequence: no __dict__
class SeqState:
    """A worker's mirror of one sequence."""

    token_ids: list[int]  # prompt + output (the worker appends what it samples)
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens with KV in this rank's cache
    params: SamplingParams
    sample_index: int
    row: int  # row in the block-table tensors
    grammar: GrammarState | None = None  # the matcher of a constrained sequence (params.grammar)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


class Worker:
    def __init__(self, config: WorkerConfig, rank: int = 0, experts: range | None = None):
        self.config, self.rank = config, rank
        self.experts = experts  # this rank's experts of every MoE layer; None = all
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.model = self.load_model()
        if should_dequantize(config.dequantize_experts, self.device, self.model):
            self.model.dequantize_experts()
        if self.device.type == "cpu":
            keep_large_allocations()  # no page faults on the step's large temporaries (host_memory.py)
            if not huge_pages_requested():
                logger.info("this process started without GLIBC_TUNABLES=glibc.malloc.hugetlb=1: its memory stays "
                            "on 4 KiB pages (CPU decode a few %% slower; gptoss-ray's own worker processes set it)")
            packed = self.model.pack_for_cpu()
            if packed:
                logger.info("packed bf16 weights for oneDNN: %s", ", ".join(packed))
        self.model_config = self.model.config
        self.model.reserve_positions(config.max_model_len)
        for moe in self.model.moe_layers():  # a bincount per layer per step, for the expert-load metric
            moe.record_expert_load = True
        self.vocab_size = self.model_config.vocab_size
        self.block_size = config.block_size
        # Pool per layer type; without sliding layers only the full pool exists.
        num_blocks = {FULL: config.num_blocks, SLIDING: max(config.num_sliding_blocks, 1)}
        static = self._use_static_decode()
        # The static runner's padding rows write one scratch block per pool, past the blocks
        # the KV manager knows, read through one extra block-table row (see decode_runner.py).
        self.kv_caches = self.allocate_kv_cache({k: n + 1 for k, n in num_blocks.items()} if static else num_blocks)
        max_blocks = -(-config.max_model_len // config.block_size)
        # The block tables live on the host as numpy arrays (vLLM v1's block_table_cpu): the
        # plan's updates are numpy writes and the step's metadata is gathered in numpy, far
        # cheaper per op than torch at these sizes. On a CPU device `block_tables` shares
        # their memory; on a GPU it is a device copy, kept equal by the same writes, which
        # the static decode runner reads inside its graphs.
        self.host_tables = {  # [R (+1 scratch row), MB] int32, -1 = no block
            kind: np.full((config.max_num_seqs + static, max_blocks), -1, dtype=np.int32) for kind in (FULL, SLIDING)
        }
        self.shared_tables = self.device.type == "cpu"
        self.block_tables = {
            kind: torch.from_numpy(host) if self.shared_tables else torch.from_numpy(host).to(self.device)
            for kind, host in self.host_tables.items()
        }
        self.seqs: dict[int, SeqState] = {}
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self.sampler = Sampler(self.device, None if config.seed is None else config.seed + rank)
        self.history: TokenHistory | None = None  # token ids on the device, once penalties are used
        self.masks: GrammarMasks | None = None  # bitmask buffers, once a constrained sequence arrives
        self.prompt_lp_seqs: set[int] = set()  # sequences whose prompt logprobs are still to compute
        self.decode_runner = self._build_decode_runner(num_blocks) if static else None

    # --- building ---------------------------------------------------------------------------------

    def load_model(self):
        from gptoss_ray.model.loader import load_model

        return load_model(self.config.model_path, self.dtype, self.device, experts=self.experts)

    def allocate_kv_cache(self, num_blocks: dict[str, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        from gptoss_ray.model.attention import allocate_kv_cache

        return allocate_kv_cache(self.model_config, num_blocks, self.block_size, self.dtype, self.device)

    def _use_static_decode(self) -> bool:
        """EngineConfig.static_decode: an explicit choice stands; auto = on CUDA with one rank
        unless enforce_eager, off on CPU unless GPTOSS_STATIC_DECODE=1 (tests)."""
        choice = self.config.static_decode
        if choice is not None:
            return choice
        if os.environ.get("GPTOSS_STATIC_DECODE", "") == "1":
            return True
        if self.device.type != "cuda" or self.config.enforce_eager:
            return False
        if self.config.ep_size > 1:
            # The expert all-to-all sizes its buffers from the step's counts (a .tolist() sync):
            # not capturable, so expert-parallel ranks decode eagerly.
            logger.info("expert parallelism (ep_size %d): no CUDA graphs, decode steps run eagerly",
                        self.config.ep_size)
            return False
        return True

    def _build_decode_runner(self, num_blocks: dict[str, int]):
        from gptoss_ray.engine.decode_runner import DecodeRunner, default_buckets

        scratch_row = self.config.max_num_seqs
        for kind in self.block_tables:  # the pool's extra block: no sequence ever gets it
            self._write_tables(kind, np.array([scratch_row]), np.array([0]), np.array([num_blocks[kind]], np.int32))
        buckets = [b for b in (self.config.graph_sizes or default_buckets(self.config.max_num_seqs))
                   if b <= self.config.max_num_seqs] or [self.config.max_num_seqs]
        graphs = self.device.type == "cuda" and not self.config.enforce_eager and self.config.ep_size == 1
        runner = DecodeRunner(self.model, self.kv_caches, self.block_tables, scratch_row, self.block_size,
                              buckets, self.device)
        if graphs:
            try:
                runner.capture()
            except Exception:  # unverified on real GPUs so far: a failed capture must not stop serving
                logger.exception("CUDA graph capture failed; decode steps run eagerly (report this)")
                return None
        else:
            logger.info("static decode runner without CUDA graphs (batch sizes %s)", runner.buckets)
        return runner

    # --- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        work = plan.ranks[self.rank]
        for seq_id in work.finished_ids:
            self._forget(seq_id)
        for new in work.new_seqs:
            self._add(new)
        for kind, updates in work.table_updates.items():
            self._apply_updates(kind, updates)
        result = self._run(work.seq_ids, work.num_new_tokens)  # zero tokens: an empty forward
        if plan.report_expert_load:
            result.expert_load = self.expert_load()
        return result

    def _forget(self, seq_id: int) -> None:
        self.prompt_lp_seqs.discard(seq_id)
        state = self.seqs.pop(seq_id, None)
        if state is not None:
            for kind, host in self.host_tables.items():
                host[state.row] = -1
                if not self.shared_tables:
                    self.block_tables[kind][state.row].fill_(-1)
            self.free_rows.append(state.row)

    def _add(self, new: NewSequence) -> None:
        state = self.seqs[new.seq_id] = SeqState(
            token_ids=list(new.token_ids), num_prompt_tokens=new.num_prompt_tokens,
            num_computed_tokens=new.num_computed_tokens, params=new.params,
            sample_index=new.sample_index, row=self.free_rows.pop(),
        )
        if new.params.grammar is not None:
            # a resumed (preempted) sequence replays its output: the matcher is rebuilt, never advanced twice
            state.grammar = GrammarState.start(new.params.grammar, new.token_ids[new.num_prompt_tokens:])
            if self.masks is None:
                self.masks = GrammarMasks(self.config.max_num_seqs, self.vocab_size, self.device)
        # sample 0 carries the request's prompt logprobs (the others reuse its cached prompt)
        if (new.params.prompt_logprobs is not None and new.sample_index == 0
                and new.num_computed_tokens < new.num_prompt_tokens - 1):
            self.prompt_lp_seqs.add(new.seq_id)
        if state.params.has_penalty and self.history is None:
            self.history = TokenHistory(self.config.max_num_seqs, self.config.max_model_len, self.vocab_size,
                                        self.device)
            for other in self.seqs.values():
                self.history.set_row(other.row, other.token_ids)
        elif self.history is not None:
            self.history.set_row(state.row, state.token_ids)

    def _apply_updates(self, kind: str, u: BlockTableUpdates) -> None:
        if not u.seq_ids:
            return
        # Updates of a sequence dropped in the same step (preempted while scheduling) are stale.
        seqs = self.seqs
        if self.shared_tables and len(u.seq_ids) <= 64:
            # A decode step's few updates (a block filled or left the window): scalar writes
            # cost less than building three index arrays (~60 us a kind at 256 sequences).
            host = self.host_tables[kind]
            for seq_id, col, block in zip(u.seq_ids, u.cols, u.blocks):
                state = seqs.get(seq_id)
                if state is not None:
                    host[state.row, col] = block
            return
        rows = np.array([seqs[s].row if s in seqs else -1 for s in u.seq_ids], dtype=np.int64)
        cols, blocks = np.array(u.cols, dtype=np.int64), np.array(u.blocks, dtype=np.int32)
        keep = rows >= 0
        if not keep.all():
            rows, cols, blocks = rows[keep], cols[keep], blocks[keep]
        self._write_tables(kind, rows, cols, blocks)

    def _write_tables(self, kind: str, rows: np.ndarray, cols: np.ndarray, blocks: np.ndarray) -> None:
        """table[kind][rows[i], cols[i]] = blocks[i], on the host and (on a GPU) on the device."""
        self.host_tables[kind][rows, cols] = blocks
        if not self.shared_tables:
            index = (torch.from_numpy(rows).to(self.device), torch.from_numpy(cols).to(self.device))
            self.block_tables[kind].index_put_(index, torch.from_numpy(blocks).to(self.device))

    def _run(self, seq_ids: list[int], num_new_tokens: list[int]) -> StepResult:
        seqs = self.seqs
        states = [seqs[seq_id] for seq_id in seq_ids]
        starts = [st.num_computed_tokens for st in states]
        # One comprehension per column, no per-sequence appends: at 256 sequences this loop
        # is a large share of a decode step's host time.
        decode = num_new_tokens.count(1) == len(num_new_tokens)  # one token per sequence
        if decode:
            input_ids = [st.token_ids[start] for st, start in zip(states, starts)]
            for st in states:
                st.num_computed_tokens += 1
        else:
            input_ids = []
            for st, start, n in zip(states, starts, num_new_tokens):
                input_ids += st.token_ids[start : start + n]
                st.num_computed_tokens = start + n
        # the chunk reached the end of the known tokens: sample the next one
        sampled = [i for i, st in enumerate(states) if st.num_computed_tokens == len(st.token_ids)]
        runner = self.decode_runner
        if runner is not None and decode and states and runner.bucket(len(states)) is not None:
            # pure decode that fits a bucket: static/graph
            hidden = runner.run(input_ids, starts, [st.row for st in states])  # [B, H]: padding cut off
            last_rows = None  # row i is sequence i's token
        else:  # prefill, mixed, or larger than every bucket: eager
            attn, positions, last_rows = self._metadata(states, starts, num_new_tokens, decode)
            ids = torch.from_numpy(np.array(input_ids, dtype=np.int64)).to(self.device, non_blocking=True)
            hidden = self.model(ids, positions, attn, self.kv_caches)  # [T, H]
            if decode:
                last_rows = None
        prompt_lp = self._prompt_logprobs(hidden, seq_ids, states, starts, num_new_tokens) if self.prompt_lp_seqs else []
        if not sampled:
            return StepResult(prompt_logprobs=prompt_lp)
        if len(sampled) < len(states):
            last_rows = np.array(sampled) if last_rows is None else last_rows[sampled]
            states = [states[i] for i in sampled]
            seq_ids = [seq_ids[i] for i in sampled]
        # Masks are built while the forward runs (asynchronously on a GPU), before its logits are read.
        constrained = [i for i, st in enumerate(states) if st.grammar is not None]
        grammar = None
        if constrained:
            mask = self.masks.fill([states[i].grammar for i in constrained])
            grammar = (torch.tensor(constrained, device=self.device), mask)
        if last_rows is not None:  # a pure decode samples every row in order: no gather
            hidden = hidden[torch.from_numpy(last_rows).to(self.device, non_blocking=True)]
        logits = self.model.compute_logits(hidden, float32=False)  # [S, V]; the sampler upcasts where it must
        meta = SamplingMetadata.build(states, self.vocab_size, list(self.config.eos_token_ids), self.device,
                                      self.history, grammar)
        out = self.sampler(logits, meta)
        for i in constrained:
            states[i].grammar.advance(out.token_ids[i])
        if self.history is not None:
            self.history.append([st.row for st in states], [len(st.token_ids) for st in states], out.token_ids)
        for st, tok in zip(states, out.token_ids):
            st.token_ids.append(tok)
        return StepResult(seq_ids=seq_ids, token_ids=out.token_ids, logprobs=out.logprobs, prompt_logprobs=prompt_lp)

    def _prompt_logprobs(self, hidden: torch.Tensor, seq_ids: list[int], states: list[SeqState], starts: list[int],
                         num_new: list[int]) -> list[PromptLogprobs]:
        """Prefill only: the logprobs of the prompt tokens that follow this chunk's positions,
        for the sequences that asked (position p's logits score prompt token p + 1)."""
        out, offset = [], 0
        for seq_id, st, start, n in zip(seq_ids, states, starts, num_new):
            end = min(start + n, st.num_prompt_tokens - 1)  # positions followed by a prompt token
            if seq_id in self.prompt_lp_seqs and start < end:
                targets = torch.tensor(st.token_ids[start + 1 : end + 1], device=self.device)
                entries = prompt_logprobs(self.model.compute_logits, hidden[offset : offset + end - start], targets,
                                          st.params.prompt_logprobs)
                out.append(PromptLogprobs(seq_id, start + 1, entries))
                if end == st.num_prompt_tokens - 1:
                    self.prompt_lp_seqs.discard(seq_id)
            offset += n
        return out

    def _metadata(self, states: list[SeqState], starts: list[int], num_new: list[int], decode: bool):
        """Attention metadata for the packed step; also the row of each sequence's last token
        (numpy). Computed in numpy from the host block tables (cheaper per op than torch at
        these sizes), then copied to the device once per tensor."""
        from gptoss_ray.model.attention import AttentionMetadata

        dev, bs = self.device, self.block_size
        start = np.array(starts, dtype=np.int64)  # [B]
        rows = np.array([st.row for st in states], dtype=np.int64)  # [B]
        if decode:  # one token per sequence, the common step, in fewer numpy ops (each costs microseconds at 256 rows)
            cu = np.arange(len(start) + 1, dtype=np.int64)
            positions, token_rows = start, rows  # [T]
            context = start + 1  # [B]
        else:
            n = np.array(num_new, dtype=np.int64)  # [B]
            cu = np.zeros(len(n) + 1, dtype=np.int64)
            np.cumsum(n, out=cu[1:])
            seq_of_token = np.repeat(np.arange(len(n)), n)  # [T]
            positions = np.arange(cu[-1]) - cu[:-1][seq_of_token] + start[seq_of_token]  # [T]
            token_rows = rows[seq_of_token]
            context = start + n  # [B]
        max_blocks = -(-int(context.max()) // bs) if len(start) else 0
        token_cols, offsets = np.divmod(positions, bs)

        def to_dev(a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
            return torch.from_numpy(a).to(device=dev, dtype=dtype, non_blocking=True)

        tables, slots = {}, {}
        for kind, host in self.host_tables.items():
            tables[kind] = to_dev(host[rows, :max_blocks], torch.int32)  # [B, MB]
            slot = host[token_rows, token_cols].astype(np.int64)  # [T]; in place below: no temporaries
            slot *= bs
            slot += offsets
            slots[kind] = to_dev(slot)
        # A decode token's own block always exists (attention reads the token back), so a
        # pure decode step writes KV without the -1 mask and its boolean-index sync.
        attn = AttentionMetadata(cu_seqlens_q=to_dev(cu, torch.int32), context_lens=to_dev(context, torch.int32),
                                 slot_mapping=slots, block_tables=tables, all_slots_valid=decode)
        return attn, to_dev(positions), cu[1:] - 1

    # --- introspection ----------------------------------------------------------------------------

    def expert_load(self) -> list[list[int]]:
        """[layer][expert] tokens of this rank routed to each expert since start."""
        return [moe.expert_counts.tolist() for moe in self.model.moe_layers()]

    def check_health(self) -> None:
        """Raises if this worker cannot run steps (overridden by remote workers)."""
