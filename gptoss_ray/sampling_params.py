"""Sampling parameters and the per-token output of a request.

Torch-free: the serve layer builds these from HTTP requests and sends them to the
engine across a Ray boundary, so they are plain dataclasses validated on creation.
The fields and their meaning follow vLLM's SamplingParams, which users already know.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property

from gptoss_ray.errors import SamplingParamsError

MAX_LOGPROBS = 20
# Last line of defence behind the API's bounds (serve/protocol.py): every number that
# reaches the sampler's tensors fits them. Engine users (LLM, benchmarks) meet these too.
MAX_N = 1024
MAX_TOKENS = 1 << 24
MAX_TOP_K = 1 << 20  # larger than any vocabulary: keeps every token
SEED_RANGE = (-(2**63), 2**63 - 1)
MAX_LOGIT_BIAS = 1024
MAX_TOKEN_ID = 1 << 24
MAX_GRAMMAR_CHARS = 1 << 20  # an llguidance grammar (a schema is bounded far below this by the API)
# Stop strings are matched on every new piece of text against a window as long as the
# longest one (gptoss_ray/output/stop.py): bounding them bounds the cost per token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024
# A token the distribution excludes (a grammar's mask, top-k) has logprob -inf, which JSON
# cannot carry: reported logprobs are clamped here, as vLLM reports -9999.0.
LOGPROB_FLOOR = -9999.0


GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (dividing logits by ~0 would overflow)

# The fields the sampler reads beyond temperature: a row with all of them at their defaults
# takes the sampler's fast path (`plain_sampling`). Every field is in one of these two
# tuples (tests/engine/test_params.py), so a new parameter cannot be silently ignored there.
SAMPLER_FIELDS = ("top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "seed", "min_tokens", "logprobs", "logit_bias", "grammar")
OTHER_FIELDS = ("n", "temperature", "max_tokens", "stop", "stop_token_ids", "ignore_eos", "prompt_logprobs",
                "skip_special_tokens")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite_in(x: object, lo: float, hi: float) -> bool:
    # NaN fails both comparisons; bools are not numbers here
    return isinstance(x, (int, float)) and not isinstance(x, bool) and lo <= x <= hi


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
    # vLLM's prompt_logprobs: each prompt token's logprob given the tokens before it, plus
    # this many top ones (computed in the prefill; such a prompt skips the prefix cache)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI: [-100, 100])
    # Constrained decoding: an llguidance Lark grammar the output must match (built from the
    # request by gptoss_ray.harmony.grammar); None = unconstrained. The worker that samples
    # the sequence compiles it (cached by hash) and masks the logits with it.
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.logit_bias is not None:
            self.logit_bias = dict(self.logit_bias)
        bias = self.logit_bias or {}
        checks = [
            ("n", _is_int(self.n) and 1 <= self.n <= MAX_N, f"must be an integer in [1, {MAX_N}]"),
            ("temperature", _finite_in(self.temperature, 0.0, 100.0), "must be between 0 and 100"),
            ("top_p", _finite_in(self.top_p, 0.0, 1.0) and self.top_p > 0.0, "must be in (0, 1]"),
            ("top_k", _is_int(self.top_k) and (self.top_k == -1 or 1 <= self.top_k <= MAX_TOP_K),
             f"must be -1 (disabled) or an integer in [1, {MAX_TOP_K}]"),
            ("min_p", _finite_in(self.min_p, 0.0, 1.0), "must be in [0, 1]"),
            ("presence_penalty", _finite_in(self.presence_penalty, -2.0, 2.0), "must be in [-2, 2]"),
            ("frequency_penalty", _finite_in(self.frequency_penalty, -2.0, 2.0), "must be in [-2, 2]"),
            ("repetition_penalty", _finite_in(self.repetition_penalty, 0.0, 10.0) and self.repetition_penalty > 0,
             "must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or (_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKENS),
             f"must be an integer in [1, {MAX_TOKENS}]"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= MAX_TOKENS,
             f"must be an integer in [0, {MAX_TOKENS}]"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"must be an integer between 0 and {MAX_LOGPROBS}"),
            ("prompt_logprobs", self.prompt_logprobs is None
             or (_is_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
             f"must be an integer between 0 and {MAX_LOGPROBS}"),
            ("seed", self.seed is None or (_is_int(self.seed) and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]),
             "must be a 64-bit signed integer"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and 0 <= t < MAX_TOKEN_ID for t in self.stop_token_ids),
             "must be token ids"),
            ("logit_bias", len(bias) <= MAX_LOGIT_BIAS and all(
                _is_int(t) and 0 <= t < MAX_TOKEN_ID and _finite_in(b, -100.0, 100.0) for t, b in bias.items()),
             f"must map at most {MAX_LOGIT_BIAS} token ids to biases in [-100, 100]"),
            ("grammar", self.grammar is None or (isinstance(self.grammar, str) and 0 < len(self.grammar) <= MAX_GRAMMAR_CHARS),
             f"must be a non-empty grammar of at most {MAX_GRAMMAR_CHARS} characters"),
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"allows at most {MAX_STOP_STRINGS} strings"),
            ("stop", all(not isinstance(s, str) or len(s) <= MAX_STOP_CHARS for s in self.stop),
             f"strings must be at most {MAX_STOP_CHARS} characters long"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise SamplingParamsError(f"{name} {why}, got {repr(getattr(self, name))[:80]}", param=name)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
                param="min_tokens",
            )

    # --- flags derived from the fields, in this one place -------------------------------------
    # Read per row per step by the engine, worker and sampler, so computed once (cached);
    # SamplingParams are not changed after they reach the engine.

    @cached_property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @cached_property
    def has_penalty(self) -> bool:
        """Presence, frequency or repetition penalty (the sampler needs the token history)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @cached_property
    def plain_sampling(self) -> bool:
        """Nothing but temperature / greedy: the sampler's fast path."""
        return all(getattr(self, name) == _DEFAULTS[name] for name in SAMPLER_FIELDS)

    @cached_property
    def plain_output(self) -> bool:
        """No logprobs to hand out with the tokens (the engine's per-token fast path; stop
        strings are the frontend's output processor's, so they do not count here)."""
        return self.logprobs is None and self.prompt_logprobs is None



_DEFAULTS = {f.name: f.default for f in fields(SamplingParams) if f.name in SAMPLER_FIELDS}


# The checks of a request against the model live here, once, for both edges: the server
# (completions' prompts, build_sampling_params) and the engine's add_request, which `LLM`
# users call directly. Each raises SamplingParamsError naming the parameter.

def check_prompt(prompt: list[int], vocab_size: int, param: str = "prompt") -> None:
    """A non-empty list of token ids in [0, vocab_size)."""
    if not prompt:
        raise SamplingParamsError("the prompt is empty", param=param)
    if any(not _is_int(t) or not 0 <= t < vocab_size for t in prompt):
        raise SamplingParamsError(f"prompt token ids must be integers in [0, {vocab_size})", param=param)


def check_context(num_prompt: int, max_tokens: int | None, max_model_len: int, prompt_param: str = "prompt") -> int:
    """The prompt leaves room in the context for max_tokens; returns max_tokens resolved
    (None: the rest of the context). Messages as OpenAI's, code context_length_exceeded."""
    if num_prompt >= max_model_len:
        raise SamplingParamsError(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
            f"{num_prompt} tokens; shorten it.", param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        return max_model_len - num_prompt
    if num_prompt + max_tokens > max_model_len:
        raise SamplingParamsError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} for the "
            "completion). Reduce the prompt or the maximum number of tokens.",
            param="max_tokens", code="context_length_exceeded")
    return max_tokens


@dataclass(slots=True)  # one per running sequence per step: slots make each ~2x cheaper to build
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
    # with a sample's first delta when prompt_logprobs was asked for: one entry per prompt
    # token (token id -> logprob, that token always included), None for the first token
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
