"""POST /v1/chat/completions: render harmony, generate, parse harmony, answer like OpenAI.

One request = one engine request with `n` samples; the output processor
(gptoss_ray/output/) parses each sample's harmony channels, cuts its content at stop
strings and decides its finish reason. Streaming sends, per sample: a role chunk, then
reasoning deltas (`reasoning_content` and `reasoning`), content deltas and tool-call
deltas (index, id, name, then argument pieces) in generation order, then a chunk with
the finish reason; usage last when `stream_options.include_usage`, then `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_ray.harmony.encoding import stop_token_ids
from gptoss_ray.harmony.grammar import chat_grammar
from gptoss_ray.harmony.parse import Delta
from gptoss_ray.harmony.render import RenderError, render_chat
from gptoss_ray.output import OutputProcessor, SampleOutput
from gptoss_ray.serve.engine_client import Admission, ServingContext
from gptoss_ray.serve.errors import OpenAIError, sse_error
from gptoss_ray.serve.protocol import ChatCompletionRequest
from gptoss_ray.serve.sampling import build_sampling_params, chat_logprobs, usage
from gptoss_ray.serve.structured import constrain, dump


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
    processor = OutputProcessor(params, harmony=True)
    admission = ctx.admit(params.n)  # 429 / 400 now, while a status can still be sent
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            admission.guard(_stream(ctx, admission, request_id, prompt, params, processor, top, include_usage)),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    with admission:
        return await _complete(ctx, request_id, prompt, params, processor, top)


def _logprobs(out: SampleOutput, top: int | None) -> list[dict[str, Any]]:
    """OpenAI logprobs.content entries of the tokens this output released (content tokens only)."""
    if top is None or not out.logprobs:
        return []
    tokens, entries = zip(*out.logprobs)
    return chat_logprobs(tokens, entries, top)


def _message(sample) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": sample.content or (None if sample.tool_calls else ""),
                           "refusal": None}  # as OpenAI sends it; the SDK's .parse() reads it
    if sample.reasoning:
        msg["reasoning_content"] = msg["reasoning"] = sample.reasoning
    if sample.tool_calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in sample.tool_calls]
    return msg


async def _complete(ctx: ServingContext, request_id: str, prompt: list[int], params, processor: OutputProcessor,
                    top: int | None) -> JSONResponse:
    num_prompt, num_cached = len(prompt), 0
    logprobs: list[list[dict[str, Any]]] = [[] for _ in processor.samples]
    async for out in ctx.generate(request_id, prompt, params, processor):
        num_prompt = out.num_prompt_tokens or num_prompt
        num_cached = max(num_cached, out.num_cached_tokens)
        logprobs[out.index] += _logprobs(out, top)
    body = {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
        "choices": [
            {"index": i, "message": _message(s), "finish_reason": s.finish_reason,
             "logprobs": {"content": logprobs[i]} if top is not None else None}
            for i, s in enumerate(processor.samples)
        ],
        "usage": usage(num_prompt, processor.samples, num_cached),
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
                  processor: OutputProcessor, top: int | None, include_usage: bool) -> AsyncIterator[str]:
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
            for i in range(len(processor.samples)):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for out in ctx.generate(request_id, prompt, params, processor):
                num_prompt = out.num_prompt_tokens or num_prompt
                num_cached = max(num_cached, out.num_cached_tokens)
                logprobs = _logprobs(out, top)
                for piece in out.pieces:  # the logprobs released with this output ride on its first chunk
                    yield chunk(out.index, _delta_json(piece), logprobs=logprobs)
                    logprobs = []
                if out.finished or logprobs:
                    yield chunk(out.index, {}, out.finish_reason, logprobs=logprobs)
        if include_usage:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [], "usage": usage(num_prompt, processor.samples, num_cached)}
            yield f"data: {json.dumps(body)}\n\n"
    except Exception as e:  # after the 200 went out, errors travel as an SSE event
        yield sse_error(e)
    yield "data: [DONE]\n\n"
