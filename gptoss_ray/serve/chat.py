"""POST /v1/chat/completions: render harmony, generate, parse harmony, answer like OpenAI.

One request = one engine request with `n` samples; each sample has its own harmony
parser. Streaming sends, per sample: a role chunk, then reasoning deltas
(`reasoning_content` and `reasoning`), content deltas and tool-call deltas (index, id,
name, then argument pieces) in generation order, then a chunk with the finish reason;
usage last when `stream_options.include_usage`, then `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_ray.harmony.encoding import stop_token_ids
from gptoss_ray.harmony.grammar import chat_grammar
from gptoss_ray.harmony.parse import Delta, HarmonyStreamParser
from gptoss_ray.harmony.render import RenderError, render_chat
from gptoss_ray.sampling_params import TokenDelta
from gptoss_ray.serve.engine_client import Admission, ServingContext
from gptoss_ray.serve.errors import OpenAIError, sse_error
from gptoss_ray.serve.protocol import ChatCompletionRequest
from gptoss_ray.serve.sampling import build_sampling_params, chat_logprobs, usage
from gptoss_ray.serve.structured import constrain, dump


@dataclass
class _Choice:
    parser: HarmonyStreamParser
    num_tokens: int = 0  # generated tokens of this sample
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # OpenAI entries of tokens not yet sent
    all_logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def openai_finish_reason(self) -> str:
        if self.finish_reason == "length" and not self.parser.stopped_by_string:
            return "length"
        return "tool_calls" if self.parser.tool_calls else "stop"


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest) -> Any:
    ctx.check_model(req.model)
    try:
        rendered = render_chat(
            [m.model_dump(exclude_none=True) for m in req.messages],
            tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
            reasoning_effort=req.reasoning_effort or ctx.config.default_reasoning_effort,
            tool_choice=req.tool_choice or "auto",
        )
    except RenderError as e:
        raise OpenAIError(400, str(e), param=e.param) from None
    prompt = rendered.token_ids
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = build_sampling_params(
        req, len(prompt), await ctx.max_model_len(), req.max_completion_tokens or req.max_tokens,
        logprobs=top, stop_token_ids=list(stop_token_ids()), prompt_param="messages",
    )
    params = await constrain(ctx, params, chat_grammar, dump(req.response_format),
                             [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                             dump(req.tool_choice), max_reasoning_tokens=req.max_reasoning_tokens)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = [_Choice(HarmonyStreamParser(stop=params.stop)) for _ in range(params.n)]
    admission = ctx.admit(params.n)  # 429 / 400 now, while a status can still be sent
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            admission.guard(_stream(ctx, admission, request_id, prompt, params, choices, top, include_usage)),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    with admission:
        return await _complete(ctx, request_id, prompt, params, choices, top)


def _absorb(choice: _Choice, delta: TokenDelta, top: int | None) -> list[Delta]:
    choice.num_tokens += len(delta.token_ids)
    pieces = choice.parser.feed(delta.token_ids)
    if top is not None and delta.logprobs:  # logprobs.content: the tokens of the reply's text only
        is_content = choice.parser.token_is_content[-len(delta.token_ids):]
        entries = [e for e, keep in zip(chat_logprobs(delta.token_ids, delta.logprobs, top), is_content) if keep]
        choice.logprobs += entries
        choice.all_logprobs += entries
    if delta.finished:
        choice.finish_reason = delta.finish_reason
        pieces += choice.parser.finish()
    return pieces


def _message(choice: _Choice) -> dict[str, Any]:
    p = choice.parser
    msg: dict[str, Any] = {"role": "assistant", "content": p.content or (None if p.tool_calls else ""),
                           "refusal": None}  # as OpenAI sends it; the SDK's .parse() reads it
    if p.reasoning:
        msg["reasoning_content"] = msg["reasoning"] = p.reasoning
    if p.tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in p.tool_calls]
    return msg


async def _complete(ctx: ServingContext, request_id: str, prompt: list[int], params, choices: list[_Choice],
                    top: int | None) -> JSONResponse:
    num_prompt, num_cached = len(prompt), 0
    async for delta in ctx.generate(request_id, prompt, params):
        num_prompt = delta.num_prompt_tokens or num_prompt
        num_cached = max(num_cached, delta.num_cached_tokens)
        _absorb(choices[delta.index], delta, top)
    body = {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
        "choices": [
            {"index": i, "message": _message(c), "finish_reason": c.openai_finish_reason(),
             "logprobs": {"content": c.all_logprobs} if top is not None else None}
            for i, c in enumerate(choices)
        ],
        "usage": usage(num_prompt, choices, num_cached),
    }
    return JSONResponse(body)


def _delta_json(piece: Delta) -> dict[str, Any]:
    if piece.kind == "reasoning":
        return {"reasoning_content": piece.text, "reasoning": piece.text}
    if piece.kind == "content":
        return {"content": piece.text}
    call: dict[str, Any] = {"index": piece.tool_index}
    if piece.tool_id is not None:
        call.update(id=piece.tool_id, type="function", function={"name": piece.tool_name, "arguments": piece.text})
    else:
        call["function"] = {"arguments": piece.text}
    return {"tool_calls": [call]}


async def _stream(ctx: ServingContext, admission: Admission, request_id: str, prompt: list[int], params,
                  choices: list[_Choice], top: int | None, include_usage: bool) -> AsyncIterator[str]:
    created, model = int(time.time()), ctx.model_name

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": {"content": logprobs} if logprobs else None,
                  "finish_reason": finish}
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    num_prompt, num_cached = len(prompt), 0
    try:
        with admission:
            for i in range(len(choices)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for delta in ctx.generate(request_id, prompt, params):
                num_prompt = delta.num_prompt_tokens or num_prompt
                num_cached = max(num_cached, delta.num_cached_tokens)
                choice = choices[delta.index]
                for piece in _absorb(choice, delta, top):
                    yield chunk(delta.index, _delta_json(piece), logprobs=choice.logprobs)
                    choice.logprobs = []
                if choice.finish_reason is not None:
                    yield chunk(delta.index, {}, choice.openai_finish_reason(), logprobs=choice.logprobs)
                    choice.logprobs = []
        if include_usage:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage(num_prompt, choices, num_cached)}
            yield f"data: {json.dumps(body)}\n\n"
    except Exception as e:  # after the 200 went out, errors travel as an SSE event
        yield sse_error(e)
    yield "data: [DONE]\n\n"
