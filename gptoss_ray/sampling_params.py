"""Sampling parameters and the per-token output of a request.

Torch-free: the serve layer builds these from HTTP requests and sends them to the
engine across a Ray boundary, so they are plain dataclasses validated on creation.
The fields and their meaning follow vLLM's SamplingParams, which users already know.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptoss_ray.errors import SamplingParamsError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    n: int = 1  # parallel samples of the same prompt (they share the prompt's KV blocks)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI semantics, subtracted from logits once a token appeared
    frequency_penalty: float = 0.0  # OpenAI semantics, subtracted per occurrence
    repetition_penalty: float = 1.0  # CTRL-style (Keskar et al. 2019), over prompt and output
    seed: int | None = None  # a seeded request samples the same tokens in any batch
    max_tokens: int | None = 16  # None = up to the context length
    min_tokens: int = 0  # stop tokens / EOS are masked until this many tokens exist
    stop: list[str] = field(default_factory=list)  # stop strings, matched on decoded text
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # return the sampled token's logprob plus this many top ones
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        checks = [
            ("n", isinstance(self.n, int) and self.n >= 1, "must be an integer >= 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be between 0 and 100"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
             "must be -1 (disabled) or an integer >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "must be an integer >= 1"),
            ("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0, "must be an integer >= 0"),
            ("logprobs", self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"must be an integer between 0 and {MAX_LOGPROBS}"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "must be non-negative integers"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamsError(f"{name} {why}, got {getattr(self, name)!r}", param=name)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class TokenDelta:
    """What the engine yields for one request after a step: the tokens that step added.

    Crosses the engine -> LLMServer -> ingress boundary (Ray), so it is plain data.
    """

    request_id: str
    index: int = 0  # which of the n samples this delta belongs to
    token_ids: list[int] = field(default_factory=list)  # new tokens this step
    # one dict per new token: token id -> logprob, the sampled token always included
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    error: str | None = None  # set with finish_reason "error"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
