"""POST /v1/completions: raw text or token ids in, raw text out (no harmony parsing).

A batch of prompts becomes one engine request per prompt, run concurrently; choice
`i * n + j` is sample j of prompt i, as OpenAI numbers them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_ray.harmony.encoding import decode
from gptoss_ray.harmony.grammar import completion_grammar
from gptoss_ray.harmony.render import encode_text
from gptoss_ray.output import OutputProcessor, SampleOutput
from gptoss_ray.errors import SamplingParamsError
from gptoss_ray.sampling_params import SamplingParams, check_prompt
from gptoss_ray.serve.engine_client import Admission, ServingContext
from gptoss_ray.serve.errors import OpenAIError, sse_error
from gptoss_ray.serve.protocol import VOCAB_LIMIT, CompletionRequest
from gptoss_ray.serve.sampling import build_sampling_params, completion_logprobs, usage
from gptoss_ray.serve.structured import constrain, dump

MAX_BATCH = 64


@dataclass
class _Choice:
    """One choice's response, built from the output processor's SampleOutputs."""

    parts: list[str] = field(default_factory=list)  # text pieces (joined once: no copy per token)
    num_tokens: int = 0
    text_offset: int = 0  # where the next token's text starts (OpenAI's logprobs.text_offset)
    finish_reason: str | None = None
    logprobs: dict[str, list] = field(default_factory=lambda: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
    echo: list[int] | None = None  # prompt ids still to send in front of the output (echo)
    drop_output: bool = False  # echo with max_tokens 0: the engine's one token is not part of the answer

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def push(self, out: SampleOutput, top: int | None) -> tuple[str, dict | None]:
        """Take one output of the processor; return the text and logprobs to send for it."""
        head, lp = "", None
        if self.echo is not None:  # the prompt goes first, with its logprobs (from the first output) when asked
            head = decode(self.echo)
            self.text_offset = len(head)
            if top is not None:
                lp = completion_logprobs(self.echo, out.prompt_logprobs or [None] * len(self.echo), top, 0)
            self.echo = None
        self.finish_reason = out.finish_reason
        piece = "" if self.drop_output else out.text
        if not self.drop_output:
            self.num_tokens += len(out.token_ids)
            if top is not None and out.logprobs:
                tokens, entries = zip(*out.logprobs)
                new = completion_logprobs(tokens, entries, top, self.text_offset)
                self.text_offset += sum(len(t) for t in new["tokens"])
                lp = new if lp is None else {key: lp[key] + new[key] for key in lp}
        for key, values in (lp or {}).items():
            self.logprobs[key] += values
        piece = head + piece
        self.parts.append(piece)
        return piece, lp


def _prompts(req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [encode_text(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [encode_text(x) for x in p]
    else:
        prompts = [list(x) for x in p]
    if not prompts:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    if len(prompts) > MAX_BATCH:
        raise OpenAIError(400, f"at most {MAX_BATCH} prompts per request", param="prompt")
    try:
        for x in prompts:
            check_prompt(x, VOCAB_LIMIT)
    except SamplingParamsError as e:
        raise OpenAIError(400, str(e), param=e.param) from None
    return prompts


async def create_completion(ctx: ServingContext, req: CompletionRequest) -> Any:
    ctx.check_model(req.model)
    if req.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if req.max_tokens == 0 and not req.echo:
        raise OpenAIError(400, "max_tokens 0 generates nothing; it is allowed with echo (to score the prompt)",
                          param="max_tokens")
    prompts = _prompts(req)
    max_len = await ctx.max_model_len()
    # echo + max_tokens 0 (lm-eval's loglikelihood): the engine runs the prefill and samples
    # one token, which the answer leaves out (vLLM does the same)
    echo_only = req.echo and req.max_tokens == 0
    params = [build_sampling_params(req, len(p), max_len, 1 if echo_only else req.max_tokens, req.logprobs, [],
                                    "prompt") for p in prompts]
    if req.echo and req.logprobs is not None:
        params = [dataclasses.replace(p, prompt_logprobs=req.logprobs) for p in params]
    if req.response_format is not None:
        fmt = dump(req.response_format)
        params = [await constrain(ctx, p, lambda f, _max_tokens, **kw: completion_grammar(f, **kw), fmt)
                  for p in params]
    request_id = f"cmpl-{uuid.uuid4().hex}"
    n = params[0].n
    choices = [_Choice(echo=prompts[k // n] if req.echo else None, drop_output=echo_only)
               for k in range(len(prompts) * n)]
    admission = ctx.admit(len(prompts) * n)  # every sequence counts: 64 prompts x n=16 is 1,024
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            admission.guard(_stream(ctx, admission, request_id, prompts, params, choices, req, include_usage)),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    with admission:
        num_prompt, _ = await _drain(ctx, request_id, prompts, params, choices, req.logprobs, None)
    body = {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name,
        "choices": [{"index": k, "text": c.text, "finish_reason": c.finish_reason,
                     "logprobs": c.logprobs if req.logprobs is not None else None} for k, c in enumerate(choices)],
        "usage": usage(num_prompt, choices),
    }
    return JSONResponse(body)


async def _drain(ctx: ServingContext, request_id: str, prompts: list[list[int]], params: list[SamplingParams],
                 choices: list[_Choice], top: int | None, queue: asyncio.Queue | None) -> tuple[int, int]:
    """Run every prompt's request; put (choice index, text, logprobs) on `queue` when streaming."""
    counts = [len(p) for p in prompts]
    n = params[0].n

    async def one(i: int) -> None:
        processor = OutputProcessor(params[i])
        async for out in ctx.generate(f"{request_id}-{i}", prompts[i], params[i], processor):
            counts[i] = out.num_prompt_tokens or counts[i]
            k = i * n + out.index
            piece, lp = choices[k].push(out, top)
            if queue is not None and (piece or lp or out.finished):
                await queue.put((k, piece, lp, out.finish_reason))

    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # one failed or we were cancelled: stop (and thereby abort) the others
            t.cancel()
    return sum(counts), 0


async def _stream(ctx: ServingContext, admission: Admission, request_id: str, prompts, params,
                  choices: list[_Choice], req: CompletionRequest, include_usage: bool) -> AsyncIterator[str]:
    created, model = int(time.time()), ctx.model_name

    def chunk(k: int, text: str, finish: str | None, lp: dict | None) -> str:
        body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": k, "text": text, "finish_reason": finish, "logprobs": lp}]}
        return f"data: {json.dumps(body)}\n\n"

    queue: asyncio.Queue = asyncio.Queue()
    try:
        with admission:
            runner = asyncio.ensure_future(_drain(ctx, request_id, prompts, params, choices, req.logprobs, queue))
            try:
                while not (runner.done() and queue.empty()):
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait([getter, runner], return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        k, piece, lp, finish = getter.result()
                        yield chunk(k, piece, finish, lp)
                    else:
                        getter.cancel()
                num_prompt, _ = runner.result()
            finally:
                runner.cancel()
        if include_usage:
            body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                    "choices": [], "usage": usage(num_prompt, choices)}
            yield f"data: {json.dumps(body)}\n\n"
    except Exception as e:
        yield sse_error(e)
    yield "data: [DONE]\n\n"
