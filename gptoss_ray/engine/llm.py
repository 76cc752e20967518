"""Offline batch generation, shaped like vLLM's `LLM`:

    llm = LLM(model="openai/gpt-oss-20b", dtype="bfloat16")
    outs = llm.generate(prompt_token_ids=[[...], [...]], sampling_params=SamplingParams(max_tokens=12))
    outs[0].outputs[0].token_ids, outs[0].outputs[0].logprobs

All prompts go to the engine at once and share its steps (continuous batching).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.errors import ConfigError, SamplingParamsError
from gptoss_ray.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None  # per token: id -> logprob, the sampled one included
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or string that ended it


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # one per sample, by index
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # SamplingParams.prompt_logprobs asked for: per prompt token, id -> logprob (None for the first)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", ep_size: int = 1, **engine_kwargs):
        try:
            config = EngineConfig(model=model, dtype=dtype, ep_size=ep_size, **engine_kwargs)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"LLM argument '{'.'.join(map(str, err['loc']))}': {err['msg']}") from None
        self.engine = LLMEngine(config)
        self.max_model_len = self.engine.max_model_len
        self._ids = itertools.count()

    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]] | Sequence[int],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A flat list of ints is one prompt."""
        prompts = [list(prompt_token_ids)] if prompt_token_ids and isinstance(prompt_token_ids[0], int) \
            else [list(p) for p in prompt_token_ids]
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params) != len(prompts):
            raise SamplingParamsError(
                f"got {len(params)} sampling_params for {len(prompts)} prompts", param="sampling_params")
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompts, params):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                results[rid] = RequestOutput(rid, prompt, [CompletionOutput(i) for i in range(p.n)])
            while self.engine.has_unfinished_requests():
                for delta in self.engine.step():
                    out = results[delta.request_id]
                    sample = out.outputs[delta.index]
                    sample.token_ids.extend(delta.token_ids)
                    if delta.logprobs is not None:
                        sample.logprobs = sample.logprobs if sample.logprobs is not None else []
                        sample.logprobs.extend(delta.logprobs)
                    out.num_cached_tokens = max(out.num_cached_tokens, delta.num_cached_tokens)
                    if delta.prompt_logprobs is not None:
                        out.prompt_logprobs = delta.prompt_logprobs
                    if delta.finished:
                        sample.finish_reason, sample.stop_reason = delta.finish_reason, delta.stop_reason
        finally:  # an error (or Ctrl-C) must not leave requests holding blocks
            for rid in results:
                self.engine.abort_request(rid)
        return list(results.values())

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
