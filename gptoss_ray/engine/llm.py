"""Offline batch generation, shaped like vLLM's `LLM`:

    llm = LLM(model="openai/gpt-oss-20b", dtype="bfloat16")
    outs = llm.generate(prompt_token_ids=[[...], [...]], sampling_params=SamplingParams(max_tokens=12))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids, outs[0].outputs[0].logprobs

All prompts go to the engine at once and share its steps (continuous batching). The
engine's deltas go through the same output processor as the server's (gptoss_ray/output/):
text, stop strings, finish reasons; a sample that hits a stop string is aborted in the
engine before the next step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.errors import ConfigError, SamplingParamsError
from gptoss_ray.output import OutputProcessor
from gptoss_ray.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str = ""  # the decoded output, cut before a stop string (special tokens as skip_special_tokens says)
    token_ids: list[int] = field(default_factory=list)  # up to the one that completed a stop string
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
        processors: dict[str, OutputProcessor] = {}
        texts: dict[tuple[str, int], list[str]] = {}
        try:
            for prompt, p in zip(prompts, params):
                rid = f"llm-{next(self._ids)}"
                self.engine.add_request(rid, prompt, p)
                results[rid] = RequestOutput(rid, prompt, [CompletionOutput(i) for i in range(p.n)])
                processors[rid] = OutputProcessor(p)
            while self.engine.has_unfinished_requests():
                to_abort = []
                for delta in self.engine.step():
                    out = processors[delta.request_id].process(delta)
                    if out is None:  # after a stop string: the engine's last delta of that sample
                        continue
                    result = results[delta.request_id]
                    sample = result.outputs[out.index]
                    sample.token_ids.extend(out.token_ids)
                    texts.setdefault((delta.request_id, out.index), []).append(out.text)
                    if out.logprobs is not None:
                        sample.logprobs = sample.logprobs if sample.logprobs is not None else []
                        sample.logprobs.extend(entry for _, entry in out.logprobs)
                    result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
                    if out.prompt_logprobs is not None:
                        result.prompt_logprobs = out.prompt_logprobs
                    if out.finished:
                        sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
                    if out.abort:
                        to_abort.append((delta.request_id, out.index))
                for rid, index in to_abort:  # vLLM's reqs_to_abort: stopped on text, stop computing it
                    self.engine.abort_request(rid, index)
        finally:  # an error (or Ctrl-C) must not leave requests holding blocks
            for rid in results:
                self.engine.abort_request(rid)
        for (rid, index), parts in texts.items():
            results[rid].outputs[index].text = "".join(parts)
        return list(results.values())

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
