"""POST /v1/responses and its stored-response routes, on the same path as chat.

A request becomes chat-shaped messages (responses_input.py), is rendered by the same
harmony renderer as chat, sampled through the same SamplingParams builder, and its
tokens go through the same output processor (harmony parse, finish reason, content
logprobs; gptoss_ray/output/). What is new here is the output's
shape: parser deltas become typed output items (`reasoning`, `message`, `function_call`)
and, when streaming, OpenAI's event sequence:

    response.created, response.in_progress,
    per item: output_item.added, [content_part.added], *.delta ..., *.done,
              [content_part.done], output_item.done
    response.completed | response.incomplete | (error, response.failed)

`OutputBuilder` (responses_output.py) produces both: the non-streamed reply is the streamed one with the events
dropped, so the two cannot disagree.

`previous_response_id` rebuilds the conversation from the store: every response in the
chain contributes its input items then its output items, oldest first. The chain keeps
its first response's date so its harmony prefix renders identically, turn after turn,
and the engine's prefix cache reuses it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_ray.harmony.encoding import stop_token_ids
from gptoss_ray.harmony.grammar import responses_grammar
from gptoss_ray.harmony.render import RenderError, render_chat
from gptoss_ray.output import OutputProcessor
from gptoss_ray.sampling_params import SamplingParams
from gptoss_ray.serve.engine_client import Admission, ServingContext
from gptoss_ray.serve.errors import OpenAIError
from gptoss_ray.serve.responses_input import function_tools, to_messages
from gptoss_ray.serve.responses_output import OutputBuilder, new_id, usage
from gptoss_ray.serve.responses_protocol import ResponsesRequest
from gptoss_ray.serve.responses_store import ResponseStore, StoredResponse, StoreError, key_hash
from gptoss_ray.serve.sampling import build_sampling_params
from gptoss_ray.serve.structured import constrain

logger = logging.getLogger(__name__)
CANCEL_POLL_S = 0.5  # a background response checks the store this often for a cancel from another replica
MAX_CHAIN = 10_000  # responses walked back through previous_response_id (a cycle guard, not a limit anyone meets)


@dataclass
class ResponsesService:
    """The Responses API's state in one ingress replica: the store and background tasks."""

    ctx: ServingContext
    store: ResponseStore
    ttl_s: float
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)  # background responses running here

    async def _store_call(self, coro: Any) -> Any:
        try:
            return await coro
        except StoreError as e:
            logger.warning("response store error: %s", e)
            self.ctx.metrics.observe_store_error()
            raise OpenAIError(503, "the response store is unavailable; retry shortly", code="store_unavailable",
                              headers={"Retry-After": "5"}) from None

    async def get(self, response_id: str, key: str) -> StoredResponse:
        record = await self._store_call(self.store.get(response_id, key)) if self.store.enabled else None
        if record is None:
            raise OpenAIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                              code="response_not_found")
        return record

    async def put(self, record: StoredResponse) -> None:
        await self._store_call(self.store.put(record))


def _api_key(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return key_hash(token.strip() if scheme.lower() == "bearer" else "")


# --- request -> prompt ---------------------------------------------------------------


def _normalize_input(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items with ids, as stored and listed by input_items."""
    if isinstance(req.input, str):
        items: list[dict[str, Any]] = [{"type": "message", "role": "user",
                                        "content": [{"type": "input_text", "text": req.input}]}]
    else:
        items = [dict(item) for item in req.input]
    for item in items:
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            item["type"] = "message"
            if isinstance(item.get("content"), str):
                part = "output_text" if item.get("role") == "assistant" else "input_text"
                item["content"] = [{"type": part, "text": item["content"]}]
        prefix = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
        if not isinstance(item.get("id"), str) or not item.get("id"):
            item["id"] = new_id(prefix.get(kind, "item"))
        item.setdefault("status", "completed")
    return items


def _check_tool_choice(req: ResponsesRequest) -> None:
    """tool_choice: "auto" | "none" | "required" | {"type": "function", "name"}; the grammar
    that enforces the last two is built by harmony.grammar.responses_grammar."""
    choice = req.tool_choice
    if choice is None or choice in ("auto", "none", "required"):
        return
    if not isinstance(choice, dict) or choice.get("type") != "function":
        kind = choice.get("type") if isinstance(choice, dict) else choice
        raise OpenAIError(400, f"tool_choice {kind!r} is not supported (auto, none, required or "
                          "{'type': 'function', 'name': ...})", param="tool_choice")


def _text_format(req: ResponsesRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    return None if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True)


async def _chain(service: ResponsesService, previous_id: str | None, key: str) -> list[StoredResponse]:
    """The stored responses of a previous_response_id chain, oldest first."""
    chain: list[StoredResponse] = []
    seen: set[str] = set()
    while previous_id and len(chain) < MAX_CHAIN and previous_id not in seen:
        seen.add(previous_id)
        try:
            record = await service.get(previous_id, key)
        except OpenAIError as e:
            if e.status == 404:
                e.param = "previous_response_id"
            raise
        chain.append(record)
        previous_id = record.previous_response_id
    return chain[::-1]


def _history(chain: list[StoredResponse]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for record in chain:
        items += record.input_items
        items += record.response.get("output") or []
    return items


def _render(req: ResponsesRequest, history: list[dict[str, Any]], items: list[dict[str, Any]],
            start_date: str | None) -> tuple[list[int], list[dict[str, Any]]]:
    messages = to_messages(history + items, first=len(history))
    if req.instructions:
        messages = [{"role": "developer", "content": req.instructions}] + messages
    effort = req.reasoning.effort if req.reasoning and req.reasoning.effort else None
    effort = "low" if effort == "minimal" else effort
    tools = function_tools(req.tools)
    try:
        rendered = render_chat(messages, tools=tools or None, reasoning_effort=effort or "medium",
                               tool_choice=req.tool_choice or "auto", start_date=start_date)
    except RenderError as e:
        raise OpenAIError(400, str(e), param="input") from None
    return rendered.token_ids, messages


def _truncate(req: ResponsesRequest, history: list[dict[str, Any]], items: list[dict[str, Any]],
              start_date: str | None, max_model_len: int) -> tuple[list[int], list[dict[str, Any]]]:
    """`truncation: auto`: drop the oldest turns (a user message and all that answers it)
    until the prompt leaves room for the output; the newest turn is never dropped."""
    prompt, _ = _render(req, history, items, start_date)
    room = req.max_output_tokens or 1
    while len(prompt) + room > max_model_len and history:
        starts = [i for i, it in enumerate(history) if it.get("type") == "message" and it.get("role") == "user"]
        cut = next((i for i in starts if i > 0), len(history))
        history = history[cut:]
        prompt, _ = _render(req, history, items, start_date)
    return prompt, history


def _sampling(req: ResponsesRequest, num_prompt: int, max_model_len: int, top: int | None) -> SamplingParams:
    view = SimpleNamespace(n=1, stop=None, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                           presence_penalty=0.0, frequency_penalty=0.0, top_k=None, min_p=None,
                           repetition_penalty=None, min_tokens=0, ignore_eos=False, logit_bias=None)
    try:
        return build_sampling_params(view, num_prompt, max_model_len, req.max_output_tokens, logprobs=top,
                                     stop_token_ids=list(stop_token_ids()), prompt_param="input")
    except OpenAIError as e:
        if e.param == "max_tokens":
            e.param = "max_output_tokens"
        raise


def _response(req: ResponsesRequest, response_id: str, created: float, model: str, status: str,
              stored: bool) -> dict[str, Any]:
    effort = req.reasoning.effort if req.reasoning else None
    return {
        "id": response_id, "object": "response", "created_at": created, "status": status,
        "background": req.background, "error": None, "incomplete_details": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "model": model, "output": [], "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id, "reasoning": {"effort": effort, "summary": None},
        "store": stored, "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": _text_format(req) or {"type": "text"}}, "tool_choice": req.tool_choice or "auto",
        "tools": [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                   "parameters": t["function"]["parameters"], "strict": t["function"]["strict"]}
                  for t in function_tools(req.tools)],
        "top_p": 1.0 if req.top_p is None else req.top_p, "top_logprobs": req.top_logprobs,
        "truncation": req.truncation or "disabled", "usage": None, "user": req.user,
    }


# --- the run -------------------------------------------------------------------------


@dataclass
class _Run:
    """One response being generated: everything needed to produce and store it."""

    service: ResponsesService
    req: ResponsesRequest
    body: dict[str, Any]  # the response object, updated as generation proceeds
    record: StoredResponse | None  # what is stored (None: store false)
    prompt: list[int]
    params: SamplingParams
    builder: OutputBuilder

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The streaming events in order; the final one carries the finished response."""
        ctx, body = self.service.ctx, self.body
        body["status"] = "in_progress"
        yield {"type": "response.created", "response": dict(body)}
        yield {"type": "response.in_progress", "response": dict(body)}
        num_prompt, num_cached = len(self.prompt), 0
        if self.req.background and self.record is not None:  # pollers see it running
            self.record.response = body
            await self.service.put(self.record)
        next_check = time.monotonic() + CANCEL_POLL_S
        try:
            async for out in ctx.generate(body["id"], self.prompt, self.params, self.builder.processor):
                num_prompt = out.num_prompt_tokens or num_prompt
                num_cached = max(num_cached, out.num_cached_tokens)
                for event in self.builder.absorb(out):
                    yield event
                if self.req.background and time.monotonic() > next_check:
                    next_check = time.monotonic() + CANCEL_POLL_S
                    if await self._cancelled():  # by a replica that is not running it
                        return  # leaving ctx.generate aborts the engine request
        except OpenAIError as e:
            body.update(status="failed", output=self.builder.output, completed_at=None,
                        error={"code": e.code or "server_error", "message": e.message},
                        usage=usage(self.builder, num_prompt, num_cached))
            await self._save()
            yield {"type": "error", "code": e.code or "server_error", "message": e.message, "param": e.param}
            yield {"type": "response.failed", "response": dict(body)}
            return
        status = self.builder.status()
        body.update(status=status, output=self.builder.output, completed_at=time.time(),
                    usage=usage(self.builder, num_prompt, num_cached),
                    incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None)
        await self._save()
        yield {"type": f"response.{status}", "response": dict(body)}

    async def _cancelled(self) -> bool:
        """A background response was cancelled or deleted (through any replica) since it was stored."""
        assert self.record is not None
        current = await self.service.store.get(self.record.id, self.record.key_hash)
        return current is None or current.response.get("status") == "cancelled"

    async def _save(self) -> None:
        if self.record is None:
            return
        if self.req.background and await self._cancelled():  # a cancel landed meanwhile (on any replica): it wins
            return
        self.record.response = self.body
        self.record.output_token_ids = self.builder.token_ids
        await self.service.put(self.record)


def _service(request: Request) -> ResponsesService:
    return request.app.state.responses


async def create_response(req: ResponsesRequest, request: Request) -> Any:
    service = _service(request)
    ctx = service.ctx
    ctx.check_model(req.model)
    _check_tool_choice(req)
    key = _api_key(request)
    explicit_store = "store" in req.model_fields_set
    if req.store and explicit_store and not service.store.enabled:
        raise OpenAIError(400, "this server stores no responses (--responses-store none); send store: false",
                          param="store")
    stored = req.store and service.store.enabled
    if req.background and not stored:
        raise OpenAIError(400, "background responses must be stored (store: true)", param="background")
    if req.background and req.stream:
        raise OpenAIError(400, "background responses cannot be streamed here; poll GET /v1/responses/{id}",
                          param="stream")
    if req.previous_response_id and not service.store.enabled:
        raise OpenAIError(404, f"Response with id '{req.previous_response_id}' not found (this server stores no "
                          "responses).", param="previous_response_id", code="response_not_found")

    chain = await _chain(service, req.previous_response_id, key)
    history = _history(chain)
    items = _normalize_input(req)
    start_date = chain[0].start_date if chain else time.strftime("%Y-%m-%d", time.gmtime())
    max_model_len = await ctx.max_model_len()
    if req.truncation == "auto":
        prompt, history = _truncate(req, history, items, start_date, max_model_len)
    else:
        prompt, _ = _render(req, history, items, start_date)
    top = (req.top_logprobs or 0) if req.wants_logprobs() else None
    params = _sampling(req, len(prompt), max_model_len, top)
    params = await constrain(ctx, params, responses_grammar, _text_format(req), req.tools, req.tool_choice,
                             param="text.format")

    response_id, created = new_id("resp"), time.time()
    body = _response(req, response_id, created, ctx.model_name, "queued" if req.background else "in_progress", stored)
    record = StoredResponse(
        id=response_id, key_hash=key, created_at=created, expires_at=created + service.ttl_s, response=body,
        input_items=items, previous_response_id=req.previous_response_id, start_date=start_date,
        prompt_token_ids=prompt) if stored else None
    run = _Run(service, req, body, record, prompt, params, OutputBuilder(top, OutputProcessor(params, harmony=True)))

    admission = ctx.admit(1)  # 429 now, while a status can still be sent
    if req.background:
        try:
            await service.put(record)
        except OpenAIError:
            admission.release()
            raise
        task = asyncio.get_running_loop().create_task(_drain_background(service, run, admission))
        service.tasks[response_id] = task
        task.add_done_callback(lambda _: service.tasks.pop(response_id, None))
        return JSONResponse(body)
    if req.stream:
        return StreamingResponse(admission.guard(_sse(admission, run)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    with admission:
        last = None
        async for event in run.events():
            last = event
    if last and last["type"] == "response.failed":
        err = run.body["error"]
        raise OpenAIError(500 if err["code"] in ("engine_error", "server_error") else 503, err["message"],
                          code=err["code"])
    return JSONResponse(run.body)


async def _sse(admission: Admission, run: _Run) -> AsyncIterator[str]:
    seq = 0
    with admission:
        async for event in run.events():
            event["sequence_number"] = seq
            seq += 1
            yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _drain_background(service: ResponsesService, run: _Run, admission: Admission) -> None:
    try:
        with admission:
            async for _ in run.events():
                pass
    except asyncio.CancelledError:
        pass
    except Exception:  # the response is marked failed when it can be; the task must not die loudly
        logger.exception("background response %s failed", run.body["id"])


# --- stored responses ----------------------------------------------------------------


async def retrieve_response(response_id: str, request: Request) -> Any:
    service = _service(request)
    record = await service.get(response_id, _api_key(request))
    return JSONResponse(record.response)


async def delete_response(response_id: str, request: Request) -> Any:
    service = _service(request)
    key = _api_key(request)
    await service.get(response_id, key)  # 404 when absent or another key's
    await service._store_call(service.store.delete(response_id, key))
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(response_id: str, request: Request) -> Any:
    service = _service(request)
    key = _api_key(request)
    record = await service.get(response_id, key)
    if not record.response.get("background"):
        raise OpenAIError(400, "only background responses can be cancelled", param="response_id")
    if record.response.get("status") in ("queued", "in_progress"):
        record.response["status"] = "cancelled"
        await service.put(record)
        task = service.tasks.get(response_id)
        if task is not None:  # running in this replica: stop it now (the engine request is aborted)
            task.cancel()
    return JSONResponse(record.response)


async def list_input_items(response_id: str, request: Request, limit: int = 20, order: str = "desc",
                           after: str | None = None) -> Any:
    service = _service(request)
    if not 1 <= limit <= 100:
        raise OpenAIError(400, "limit must be between 1 and 100", param="limit")
    if order not in ("asc", "desc"):
        raise OpenAIError(400, "order must be 'asc' or 'desc'", param="order")
    record = await service.get(response_id, _api_key(request))
    items = list(record.input_items if order == "asc" else reversed(record.input_items))
    if after is not None:
        ids = [it.get("id") for it in items]
        if after not in ids:
            raise OpenAIError(400, f"no input item with id {after!r} in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})
