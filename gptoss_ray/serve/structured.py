"""Structured outputs and forced tool calls at the API: request -> checked grammar, or a 400.

The grammars themselves are built in gptoss_ray.harmony.grammar (one function per API
shape: chat_grammar, completion_grammar, responses_grammar); this module compiles them once
in the ingress (llguidance, bounded by `ServeConfig.grammar_timeout_s`, off the event loop)
so that an unsupported or unsatisfiable schema is a 400 naming it before the engine sees the
request, and returns the SamplingParams that carry it. The /v1/responses handler calls
`constrain(ctx, params, responses_grammar, text_format, tools, tool_choice, ...)` the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from gptoss_ray.harmony.guidance import GrammarError, check
from gptoss_ray.sampling_params import SamplingParams
from gptoss_ray.serve.errors import OpenAIError


async def constrain(ctx: Any, params: SamplingParams, build: Callable[..., str | None], *args: Any,
                    param: str = "response_format", **kwargs: Any) -> SamplingParams:
    """`params` with the grammar `build(*args, max_tokens, **kwargs)` returns (unchanged when it
    returns None). Raises OpenAIError 400 naming the parameter for a schema that cannot be served."""
    config = ctx.config
    try:
        grammar = build(*args, params.max_tokens, max_string_length=config.structured_max_string_length, **kwargs)
        if grammar is None:
            return params
        await asyncio.to_thread(check, grammar, config.grammar_timeout_s)
    except GrammarError as e:
        raise OpenAIError(400, f"cannot constrain the output: {e}", param=e.param or param) from None
    return dataclasses.replace(params, grammar=grammar)


def dump(value: Any) -> Any:
    """A pydantic request field as plain data (None stays None, strings stay strings)."""
    return value.model_dump(exclude_none=True) if hasattr(value, "model_dump") else value
