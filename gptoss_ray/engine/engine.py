"""The engine: requests in, token deltas out, one `step()` at a time.

    step():  Scheduler.schedule -> Executor.execute (workers: forward + sample) -> postprocess

The scheduler decides which sequences compute how many tokens on which rank and keeps
the block tables; the workers own the model, the KV tensors and the sampler and return
sampled token ids (never logits); postprocess appends tokens, checks the stop conditions
that token ids show (stop token ids, EOS, min_tokens, lengths), frees finished sequences'
blocks and emits TokenDeltas. Text is not the engine's business: detokenizing and stop
strings happen in the output processor (gptoss_ray/output/), which aborts a sample
whose text hit a stop string. Single-threaded: AsyncLLMEngine
runs `step()` in a background thread, LLM calls it in a loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from gptoss_ray.config import HARMONY_STOP_TOKEN_IDS, EngineConfig, ModelConfig, check_max_model_len
from gptoss_ray.engine.executor import Executor, InProcessExecutor
from gptoss_ray.engine.kv_cache import KVCacheManager, plan_num_blocks, sliding_blocks_needed
from gptoss_ray.engine.memory import kv_cache_bytes
from gptoss_ray.engine.plan import SLIDING, StepResult
from gptoss_ray.engine.scheduler import Scheduler
from gptoss_ray.engine.sequence import Request, Sequence
from gptoss_ray.engine.worker import WorkerConfig
from gptoss_ray.engine_api import EngineStats
from gptoss_ray.errors import GptOssError, SamplingParamsError
from gptoss_ray.parallel.errors import WorkerGroupError
from gptoss_ray.sampling_params import SamplingParams, TokenDelta, check_context, check_prompt

logger = logging.getLogger(__name__)

EXPERT_LOAD_EVERY = 16  # steps between expert-load reports from the workers


def build_worker_config(config: EngineConfig) -> tuple[WorkerConfig, ModelConfig]:
    """Resolve the user's config once: checkpoint path, device, dtype, KV pool sizes."""
    from gptoss_ray.checkpoint import default_demo_checkpoint, locate

    path = locate(config.model) if config.model else default_demo_checkpoint()
    model = ModelConfig.from_json_file(Path(path) / "config.json")
    check_max_model_len(config, model)
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    bs = config.block_size
    max_model_len = config.max_model_len or model.max_position_embeddings
    n_sliding_layers = sum(t == SLIDING for t in model.layer_types)
    per_layer = 2 * bs * model.num_key_value_heads * model.head_dim * torch.finfo(getattr(torch, dtype)).bits // 8
    full_bytes = (model.num_hidden_layers - n_sliding_layers) * per_layer
    sliding_bytes = n_sliding_layers * per_layer
    needed = sliding_blocks_needed(model.sliding_window, bs, config.max_num_seqs, config.max_num_batched_tokens)
    if config.num_kv_blocks is not None:
        num_blocks, num_sliding = config.num_kv_blocks, min(config.num_kv_blocks, needed) if sliding_bytes else 0
    else:
        num_blocks, num_sliding = plan_num_blocks(kv_cache_bytes(config, path, model, device, dtype), max(full_bytes, 1),
                                                  sliding_bytes, needed)
    if max_model_len > num_blocks * bs:
        logger.warning("max_model_len %d exceeds the KV pool (%d tokens); capping it", max_model_len, num_blocks * bs)
        max_model_len = num_blocks * bs
    worker = WorkerConfig(
        model_path=str(path), dtype=dtype, device=device, block_size=bs, num_blocks=num_blocks,
        num_sliding_blocks=num_sliding, max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
        ep_size=config.ep_size, eos_token_ids=tuple(eos_token_ids(model)),
        dequantize_experts=config.dequantize_experts, enforce_eager=config.enforce_eager,
        static_decode=config.static_decode,
        graph_sizes=tuple(config.cuda_graph_sizes) if config.cuda_graph_sizes else None,
    )
    return worker, model


def create_executor(worker_config: WorkerConfig, config: EngineConfig) -> Executor:
    if worker_config.ep_size == 1:
        return InProcessExecutor(worker_config)
    # Imported here: Ray is a dependency of expert parallelism only, not of one-rank engines.
    from gptoss_ray.engine.ray_executor import RayExecutor

    logger.info("expert parallelism over %d ranks", worker_config.ep_size)
    return RayExecutor(worker_config, config)


def eos_token_ids(model: ModelConfig) -> set[int]:
    # <|return|> and <|call|> end an assistant turn; sampling past them is meaningless.
    extra = HARMONY_STOP_TOKEN_IDS if model.vocab_size > max(HARMONY_STOP_TOKEN_IDS) else ()
    return set(model.eos_token_ids) | set(extra)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.worker_config, self.model_config = build_worker_config(config)
        wc = self.worker_config
        self.max_model_len = wc.max_model_len
        self.executor = executor if executor is not None else create_executor(wc, config)
        window = self.model_config.sliding_window if wc.num_sliding_blocks else None
        self.kv = [KVCacheManager(wc.num_blocks, wc.num_sliding_blocks, wc.block_size, window)
                   for _ in range(config.ep_size)]
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_prefix_caching)
        self.eos_token_ids = frozenset(eos_token_ids(self.model_config))
        self.requests: dict[str, Request] = {}
        self.seqs: dict[int, Sequence] = {}
        self.expert_load: list[list[int]] | None = None
        self.num_steps = 0

    # --- requests ----------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        max_output_tokens = self._validate(request_id, prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, max_output_tokens, children_spawned=params.n == 1)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt_token_ids)
        self.requests[request_id] = req
        self._add_seq(req, 0)

    def _add_seq(self, req: Request, index: int, rank_hint: int = -1) -> None:
        p, num_prompt = req.params, len(req.prompt_token_ids)
        eos = frozenset() if p.ignore_eos else self.eos_token_ids
        seq = Sequence(request_id=req.request_id, token_ids=list(req.prompt_token_ids),
                       num_prompt_tokens=num_prompt, params=p, index=index, rank_hint=rank_hint,
                       stop_ids=frozenset(p.stop_token_ids) | eos,
                       max_output_tokens=req.max_output_tokens,
                       spawn_pending=index == 0 and p.n > 1)
        req.seqs.append(seq)
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq, front=index > 0)  # later samples of an old request go first

    def _validate(self, request_id: str, prompt: list[int], params: SamplingParams) -> int:
        """Raise on a request this engine cannot run; return its max_tokens resolved."""
        if request_id in self.requests:
            raise GptOssError(f"request id {request_id!r} is already running")
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"expected SamplingParams, got {type(params).__name__}", param="sampling_params")
        vocab = self.model_config.vocab_size
        check_prompt(prompt, vocab)
        max_output_tokens = check_context(len(prompt), params.max_tokens, self.max_model_len)
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise SamplingParamsError(f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        if params.grammar is not None:
            self._check_grammar(params.grammar)
        return max_output_tokens

    def _check_grammar(self, grammar: str) -> None:
        """Compile once here (cached by hash), so a bad grammar is an error now, not a failed step."""
        from gptoss_ray.config import HARMONY_VOCAB_SIZE
        from gptoss_ray.harmony.guidance import GrammarError, check

        if self.model_config.vocab_size != HARMONY_VOCAB_SIZE:
            raise SamplingParamsError("constrained decoding needs the o200k_harmony vocabulary", param="grammar")
        try:
            check(grammar)
        except GrammarError as e:
            raise SamplingParamsError(str(e), param=e.param or "grammar") from None

    def abort_request(self, request_id: str, index: int | None = None) -> list[TokenDelta]:
        """Stop a request (or only its sample `index`, which the output processor ended
        on a stop string) now: its sequences leave the queues and their blocks are freed.
        Returns a final "abort" delta for each sample that had not finished."""
        if index is None:
            return self._end_request(request_id, "abort")
        req = self.requests.get(request_id)
        seq = next((s for s in req.seqs if s.index == index), None) if req is not None else None
        if seq is None or seq.is_finished:  # finished meanwhile (or never started: nothing to stop)
            return []
        seq.finish_reason = "abort"
        return [self._finish_seq(seq, req, TokenDelta(request_id, index, finish_reason="abort",
                                                      num_prompt_tokens=seq.num_prompt_tokens))]

    def _end_request(self, request_id: str, reason: str, error: str | None = None) -> list[TokenDelta]:
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        deltas = []
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = reason
                deltas.append(TokenDelta(request_id, seq.index, finish_reason=reason, error=error,
                                         num_prompt_tokens=seq.num_prompt_tokens))
            self.seqs.pop(seq.seq_id, None)
        for index in range(len(req.seqs), req.params.n):  # samples not started yet
            deltas.append(TokenDelta(request_id, index, finish_reason=reason, error=error,
                                     num_prompt_tokens=len(req.prompt_token_ids)))
        return deltas

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- the step ----------------------------------------------------------------------------------

    def step(self) -> list[TokenDelta]:
        plan, scheduled = self.scheduler.schedule()
        if not scheduled and not any(r.finished_ids for r in plan.ranks):
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler stalled: the next waiting request does not fit the KV pool")
            return []
        self.num_steps += 1
        plan.report_expert_load = self.num_steps % EXPERT_LOAD_EVERY == 1
        try:
            results = self.executor.execute(plan)
        except WorkerGroupError as e:
            return self._recover_from_lost_workers(e)
        return self._postprocess(scheduled, results)

    def _recover_from_lost_workers(self, e: WorkerGroupError) -> list[TokenDelta]:
        """The expert-parallel group died and took every sequence's KV with it: end the
        requests it held with "error", forget what the workers held, keep the waiting ones.
        The executor builds a fresh group on the next step."""
        logger.error("workers lost (%s): failing %d running sequences", e, len(self.scheduler.running))
        lost = {seq.request_id for seq in self.scheduler.running}
        deltas = [d for rid in lost for d in self._end_request(rid, "error", f"worker failure: {e}")]
        self.scheduler.forget_workers()
        for kv in self.kv:
            kv.reset_prefix_cache()
            kv.drain_updates()
        return deltas

    def _postprocess(self, scheduled: list[tuple[Sequence, int]], results: list[StepResult]) -> list[TokenDelta]:
        bs, kv = self.worker_config.block_size, self.kv
        for seq, n in scheduled:
            before = seq.num_computed_tokens
            seq.num_computed_tokens = after = before + n
            # A running sequence's blocks are named up to num_computed_tokens // bs at every
            # step's start (allocate and this loop keep that), so only a block that filled
            # up this step needs the KV manager: one step in block_size for a decode.
            if after // bs > before // bs:
                kv[seq.rank].register_computed(seq, after // bs)
        loads = [r.expert_load for r in results if r.expert_load is not None]
        if loads:  # each rank counts its own tokens' routing over all experts: the sum is the model's
            self.expert_load = [[sum(col) for col in zip(*layers)] for layers in zip(*loads)]
        deltas = []
        for result in results:
            for chunk in result.prompt_logprobs:  # before the tokens: a first token's delta carries them
                seq = self.seqs.get(chunk.seq_id)
                if seq is not None:
                    lps = self.requests[seq.request_id].prompt_logprobs
                    lps[chunk.start : chunk.start + len(chunk.logprobs)] = chunk.logprobs
        seqs, append = self.seqs, deltas.append
        for result in results:
            for seq_id, token, lp in zip(result.seq_ids, result.token_ids, result.logprobs):
                seq = seqs.get(seq_id)
                if seq is None:  # aborted since it was scheduled
                    continue
                tokens = seq.token_ids
                tokens.append(token)
                if (token not in seq.stop_ids and len(tokens) - seq.num_prompt_tokens < seq.max_output_tokens
                        and seq.params.plain_output and not seq.spawn_pending):  # Sequence.fast_path
                    # The common case, kept lean: nothing ends the sequence.
                    # positional (request_id, index, token_ids, logprobs, finish_reason, stop_reason,
                    # error, num_prompt_tokens, num_cached_tokens): keywords cost more per call
                    append(TokenDelta(seq.request_id, seq.index, [token], None, None, None, None,
                                      seq.num_prompt_tokens, seq.num_cached_tokens))
                else:
                    append(self._append_token(seq, lp))
        return deltas

    def _append_token(self, seq: Sequence, logprobs: dict[int, float] | None) -> TokenDelta:
        """Everything beyond the fast path: logprobs, n>1, stop conditions."""
        req = self.requests[seq.request_id]
        if seq.spawn_pending:  # sample 0's prompt is in the cache now: start the others
            seq.spawn_pending = False
            req.children_spawned = True
            for index in range(req.params.n - 1, 0, -1):
                self._add_seq(req, index, rank_hint=seq.rank)
            req.seqs.sort(key=lambda s: s.index)
        self._check_stop(seq)
        delta = TokenDelta(
            request_id=seq.request_id, index=seq.index, token_ids=seq.token_ids[-1:],
            logprobs=[logprobs] if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            prompt_logprobs=req.prompt_logprobs if seq.num_output_tokens == 1 else None,  # with the first delta
        )
        return self._finish_seq(seq, req, delta) if seq.finish_reason is not None else delta

    def _check_stop(self, seq: Sequence) -> None:
        """Set the finish reason if the token just appended ends `seq`: a stop token id or
        EOS (once min_tokens are out), or a length limit. Stop strings are matched on
        text, by the output processor."""
        token, num_out = seq.token_ids[-1], seq.num_output_tokens
        if token in seq.stop_ids and num_out >= seq.params.min_tokens:
            seq.finish_reason = "stop"
            seq.stop_reason = token if token in seq.params.stop_token_ids else None
        elif num_out >= seq.max_output_tokens:
            seq.finish_reason = "length"

    def _finish_seq(self, seq: Sequence, req: Request, delta: TokenDelta) -> TokenDelta:
        self.scheduler.finish(seq)
        self.seqs.pop(seq.seq_id, None)
        if req.is_finished:
            del self.requests[seq.request_id]
        return delta

    # --- introspection -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        total = sum(kv.full.num_blocks for kv in self.kv)
        free = sum(kv.num_free_blocks for kv in self.kv)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=1.0 - free / total,
            num_free_blocks=free,
            num_total_blocks=total,
            prefix_cache_hits=sum(kv.num_hit_tokens for kv in self.kv),
            prefix_cache_queries=sum(kv.num_query_tokens for kv in self.kv),
            num_preemptions=self.scheduler.num_preemptions,
            expert_load=self.expert_load,
            ep=self.executor.stats(),
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
