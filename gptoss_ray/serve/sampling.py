"""From OpenAI request fields to SamplingParams, and the shared pieces of responses
(usage, logprobs) used by both chat and text completions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gptoss_ray.errors import SamplingParamsError
from gptoss_ray.harmony.encoding import decode, token_bytes
from gptoss_ray.sampling_params import LOGPROB_FLOOR, SamplingParams, check_context
from gptoss_ray.serve.errors import OpenAIError


def build_sampling_params(req: Any, num_prompt_tokens: int, max_model_len: int, max_tokens: int | None,
                          logprobs: int | None, stop_token_ids: list[int], prompt_param: str) -> SamplingParams:
    """Validate lengths against the context and map OpenAI's fields (400 naming the parameter)."""
    try:
        max_tokens = check_context(num_prompt_tokens, max_tokens, max_model_len, prompt_param)
    except SamplingParamsError as e:
        raise OpenAIError(400, str(e), param=e.param, code=e.code) from None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])  # bounded by SamplingParams
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    if top_p == 0.0:  # OpenAI accepts 0: only the most likely token, i.e. greedy
        temperature, top_p = 0.0, 1.0
    try:
        return SamplingParams(
            n=req.n, temperature=temperature, top_p=top_p, seed=req.seed,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            top_k=-1 if req.top_k in (None, 0) else req.top_k, min_p=req.min_p or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, max_tokens=max_tokens,
            min_tokens=req.min_tokens, stop=stop, stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos, logprobs=logprobs,
            logit_bias={int(t): b for t, b in req.logit_bias.items()} if req.logit_bias else None,
            skip_special_tokens=getattr(req, "skip_special_tokens", True),
        )
    except SamplingParamsError as e:
        raise OpenAIError(400, str(e), param=e.param) from None


def usage(num_prompt: int, choices: Sequence[Any], num_cached: int = 0) -> dict[str, Any]:
    """Exact usage: completion tokens counted from the token ids, reasoning = analysis-channel tokens."""
    completion = sum(c.num_tokens for c in choices)
    reasoning = sum(c.parser.num_reasoning_tokens for c in choices if getattr(c, "parser", None) is not None)
    return {
        "prompt_tokens": num_prompt, "completion_tokens": completion, "total_tokens": num_prompt + completion,
        "completion_tokens_details": {"reasoning_tokens": reasoning},
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, float]], k: int) -> list[dict[str, Any]]:
    """OpenAI chat `logprobs.content` entries for these tokens."""
    out = []
    for token, entry in zip(token_ids, logprobs):
        out.append({
            "token": decode([token]), "logprob": float(entry.get(token, LOGPROB_FLOOR)),
            "bytes": list(token_bytes(token)),
            "top_logprobs": [{"token": decode([t]), "logprob": float(lp), "bytes": list(token_bytes(t))}
                             for t, lp in _top(entry, k)],
        })
    return out


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[dict[int, float] | None], k: int,
                        text_offset: int) -> dict[str, list]:
    """Legacy /v1/completions logprobs for these tokens; `text_offset` is where the first one starts.
    An entry of None (an echoed prompt's first token, which nothing predicts) gives nulls."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(token_ids, logprobs):
        text = decode([token])
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else float(entry.get(token, LOGPROB_FLOOR)))
        out["top_logprobs"].append(None if entry is None else {decode([t]): float(lp) for t, lp in _top(entry, k)})
        out["text_offset"].append(text_offset)
        text_offset += len(text)
    return out
