"""POST /v1/responses and its stored-response routes, on the same path as chat.

A request becomes chat-shaped messages (responses_input.py), is rendered by the same
harmony renderer as chat, sampled through the same SamplingParams builder, and its
tokens are parsed by the same harmony stream parser. What is new here is the output's
shape: parser deltas become typed output items (`reasoning`, `message`, `function_call`)
and, when streaming, OpenAI's event sequence:

    response.created, response.in_progress,
    per item: output_item.added, [content_part.added], *.delta ..., *.done,
              [content_part.done], output_item.done
    response.completed | response.incomplete | (error, response.failed)

`_Builder` produces both: the non-streamed reply is the streamed one with the events
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
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_ray.harmony.encoding import stop_token_ids
from gptoss_ray.harmony.grammar import responses_grammar
from gptoss_ray.harmony.parse import Delta, HarmonyStreamParser
from gptoss_ray.harmony.render import RenderError, render_chat
from gptoss_ray.sampling_params import SamplingParams
from gptoss_ray.serve.engine_client import Admission, ServingContext
from gptoss_ray.serve.errors import OpenAIError
from gptoss_ray.serve.responses_input import function_tools, to_messages
from gptoss_ray.serve.responses_protocol import ResponsesRequest
from gptoss_ray.serve.responses_store import ResponseStore, StoredResponse, StoreError, key_hash
from gptoss_ray.serve.sampling import build_sampling_params, chat_logprobs
from gptoss_ray.serve.structured import constrain

logger = logging.getLogger(__name__)
CANCEL_POLL_S = 0.5  # a background response checks the store this often for a cancel from another replica
MAX_CHAIN = 10_000  # responses walked back through previous_response_id (a cycle guard, not a limit anyone meets)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


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
            item["id"] = _new_id(prefix.get(kind, "item"))
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


# --- output items and events -----------------------------------------------------------


@dataclass
class _Builder:
    """Parser deltas -> output items, and the streaming events that build them."""

    top: int | None  # top_logprobs when logprobs are included, else None
    parser: HarmonyStreamParser = field(default_factory=HarmonyStreamParser)
    output: list[dict[str, Any]] = field(default_factory=list)
    num_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    _open: dict[str, Any] | None = None  # the item being streamed
    _logprobs: list[dict[str, Any]] = field(default_factory=list)  # entries not yet sent with a delta
    _item_logprobs: list[dict[str, Any]] = field(default_factory=list)

    def absorb(self, token_ids: list[int], logprobs: list | None, finished: bool,
               finish_reason: str | None) -> list[dict[str, Any]]:
        self.num_tokens += len(token_ids)
        self.token_ids += token_ids
        pieces = self.parser.feed(token_ids)
        if self.top is not None and logprobs:
            is_content = self.parser.token_is_content[-len(token_ids):] if token_ids else []
            self._logprobs += [e for e, keep in zip(chat_logprobs(token_ids, logprobs, self.top), is_content) if keep]
        if finished:
            self.finish_reason = finish_reason
            pieces += self.parser.finish()
        events = []
        for piece in pieces:
            events += self._piece(piece)
        if finished:
            events += self._close(self.status() == "completed")
        return events

    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"

    def _piece(self, piece: Delta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        kind = {"reasoning": "reasoning", "content": "message", "tool_call": "function_call"}[piece.kind]
        if self._open is None or self._open["type"] != kind or piece.tool_id is not None:
            events += self._close(True)
            events += self._start(kind, piece)
        item, ref = self._open, self._ref()
        if kind == "reasoning":
            item["content"][0]["text"] += piece.text
            events.append({"type": "response.reasoning_text.delta", **ref, "content_index": 0, "delta": piece.text})
        elif kind == "message":
            item["content"][0]["text"] += piece.text
            sent, self._logprobs = self._logprobs, []
            self._item_logprobs += sent
            events.append({"type": "response.output_text.delta", **ref, "content_index": 0, "delta": piece.text,
                           "logprobs": sent})
        elif piece.text:
            item["arguments"] += piece.text
            events.append({"type": "response.function_call_arguments.delta", **ref, "delta": piece.text})
        return events

    def _ref(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.output) - 1}

    def _start(self, kind: str, piece: Delta) -> list[dict[str, Any]]:
        if kind == "reasoning":
            item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "status": "in_progress",
                    "content": [{"type": "reasoning_text", "text": ""}]}
        elif kind == "message":
            item = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]}
            self._item_logprobs = []
        else:
            call = self.parser.tool_calls[piece.tool_index or 0]
            item = {"id": _new_id("fc"), "type": "function_call", "call_id": call.id, "name": call.name,
                    "arguments": "", "status": "in_progress"}
        added = json.loads(json.dumps(item))  # the empty shell, as OpenAI sends it
        if kind != "function_call":
            added["content"] = []
        self.output.append(item)
        self._open = item
        events = [{"type": "response.output_item.added", "output_index": len(self.output) - 1, "item": added}]
        if kind != "function_call":
            part = dict(item["content"][0])
            events.append({"type": "response.content_part.added", **self._ref(), "content_index": 0, "part": part})
        return events

    def _close(self, complete: bool) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        self._open = None
        ref = {"item_id": item["id"], "output_index": len(self.output) - 1}
        item["status"] = "completed" if complete else "incomplete"
        events: list[dict[str, Any]] = []
        if item["type"] == "reasoning":
            part = item["content"][0]
            events.append({"type": "response.reasoning_text.done", **ref, "content_index": 0, "text": part["text"]})
            events.append({"type": "response.content_part.done", **ref, "content_index": 0, "part": part})
        elif item["type"] == "message":
            part = item["content"][0]
            self._item_logprobs += self._logprobs
            self._logprobs = []
            if self.top is not None:
                part["logprobs"] = self._item_logprobs
            events.append({"type": "response.output_text.done", **ref, "content_index": 0, "text": part["text"],
                           "logprobs": part["logprobs"]})
            events.append({"type": "response.content_part.done", **ref, "content_index": 0, "part": part})
        else:
            events.append({"type": "response.function_call_arguments.done", **ref, "arguments": item["arguments"],
                           "name": item["name"]})
        events.append({"type": "response.output_item.done", "output_index": ref["output_index"], "item": item})
        return events


def _usage(builder: _Builder, num_prompt: int, num_cached: int) -> dict[str, Any]:
    return {"input_tokens": num_prompt, "input_tokens_details": {"cached_tokens": num_cached, "cache_write_tokens": 0},
            "output_tokens": builder.num_tokens,
            "output_tokens_details": {"reasoning_tokens": builder.parser.num_reasoning_tokens},
            "total_tokens": num_prompt + builder.num_tokens}


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
    builder: _Builder

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The streaming events in order; the final one carries the finished response."""
        ctx, body = self.service.ctx, self.body
        body["status"] = "in_progress"
        yield {"type": "response.created", "response": dict(body)}
        yield {"type": "response.in_progress", "response": dict(body)}
        num_prompt, num_cached = len(self.prompt), 0
        if self.req.background and self.record is not None:  # pollers see it running
            await self._save()
        next_check = time.monotonic() + CANCEL_POLL_S
        try:
            async for delta in ctx.generate(body["id"], self.prompt, self.params):
                num_prompt = delta.num_prompt_tokens or num_prompt
                num_cached = max(num_cached, delta.num_cached_tokens)
                for event in self.builder.absorb(delta.token_ids, delta.logprobs, delta.finished, delta.finish_reason):
                    yield event
                if self.req.background and time.monotonic() > next_check:
                    next_check = time.monotonic() + CANCEL_POLL_S
                    if await self._cancelled():  # by a replica that is not running it
                        return  # leaving ctx.generate aborts the engine request
        except OpenAIError as e:
            body.update(status="failed", output=self.builder.output, completed_at=None,
                        error={"code": e.code or "server_error", "message": e.message},
                        usage=_usage(self.builder, num_prompt, num_cached))
            await self._save()
            yield {"type": "error", "code": e.code or "server_error", "message": e.message, "param": e.param}
            yield {"type": "response.failed", "response": dict(body)}
            return
        status = self.builder.status()
        body.update(status=status, output=self.builder.output, completed_at=time.time(),
                    usage=_usage(self.builder, num_prompt, num_cached),
                    incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None)
        await self._save()
        yield {"type": f"response.{status}", "response": dict(body)}

    async def _cancelled(self) -> bool:
        assert self.record is not None
        current = await self.service.store.get(self.record.id, self.record.key_hash)
        return current is not None and current.response.get("status") == "cancelled"

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

    response_id, created = _new_id("resp"), time.time()
    body = _response(req, response_id, created, ctx.model_name, "queued" if req.background else "in_progress", stored)
    record = StoredResponse(
        id=response_id, key_hash=key, created_at=created, expires_at=created + service.ttl_s, response=body,
        input_items=items, previous_response_id=req.previous_response_id, start_date=start_date,
        prompt_token_ids=prompt) if stored else None
    run = _Run(service, req, body, record, prompt, params, _Builder(top))

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
