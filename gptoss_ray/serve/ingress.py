"""OpenAIIngress: the FastAPI app in front of the LLMServer, as a Serve deployment.

Routes come from one table (ROUTES). Every route but /health needs the API key when one
is set (CORS preflights are answered before the key is checked, as browsers send none); bodies larger than `max_body_bytes` get 413 before any parsing; every error is
OpenAI's envelope (errors.py). The same `build_api` runs in-process over a LocalClient
for ASGI-level tests (schemathesis).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from ray import serve

from gptoss_ray.metrics import CONTENT_TYPE, ServingMetrics
from gptoss_ray.serve.chat import create_chat_completion
from gptoss_ray.serve.completions import create_completion
from gptoss_ray.serve.config import ServeConfig, install_log_level
from gptoss_ray.serve.engine_client import HandleClient, ServingContext
from gptoss_ray.serve.errors import error_response, install_error_handlers
from gptoss_ray.serve.responses import (
    ResponsesService,
    cancel_response,
    create_response,
    delete_response,
    list_input_items,
    retrieve_response,
)
from gptoss_ray.serve.responses_protocol import DeletedResponse, InputItemList, ResponseObject
from gptoss_ray.serve.responses_store import open_store
from gptoss_ray.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)
from gptoss_ray.serve.tokenize import detokenize, server_version, tokenize, tokenizer_info

logger = logging.getLogger(__name__)
STARTED = int(time.time())


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    return await create_chat_completion(_ctx(request), body)


async def completions(body: CompletionRequest, request: Request) -> Any:
    return await create_completion(_ctx(request), body)


async def _model_cards(ctx: ServingContext) -> list[dict[str, Any]]:
    try:
        max_len = await asyncio.wait_for(ctx.max_model_len(), ctx.config.health_timeout_s)
    except Exception:  # still loading: the card is useful without it
        max_len = None
    return [{"id": name, "object": "model", "created": STARTED, "owned_by": "gptoss-ray", "root": ctx.model_name,
             "max_model_len": max_len} for name in ctx.config.model_names]


async def list_models(request: Request) -> Any:
    return JSONResponse({"object": "list", "data": await _model_cards(_ctx(request))})


async def retrieve_model(model_id: str, request: Request) -> Any:
    ctx = _ctx(request)
    ctx.check_model(model_id, param="model_id")
    return JSONResponse(next(c for c in await _model_cards(ctx) if c["id"] == model_id))


async def tokenize_route(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> Any:
    return await tokenize(_ctx(request), body)


async def detokenize_route(body: DetokenizeRequest, request: Request) -> Any:
    return await detokenize(_ctx(request), body)


async def tokenizer_info_route(request: Request) -> Any:
    return await tokenizer_info(_ctx(request))


async def version_route() -> Any:
    return JSONResponse({"version": server_version()})


async def health(request: Request) -> Any:
    ctx = _ctx(request)
    try:
        await asyncio.wait_for(ctx.client.check_health(), ctx.config.health_timeout_s)
    except Exception as e:
        logger.warning("health check failed: %s", type(e).__name__)
        return error_response(503, "the engine is not ready or not healthy", code="engine_unavailable",
                              headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Any:
    ctx = _ctx(request)
    store = request.app.state.responses.store
    if store.enabled:
        try:
            ctx.metrics.labels(ctx.metrics.store_size).set(await asyncio.wait_for(store.count(), ctx.config.health_timeout_s))
        except Exception as e:
            ctx.metrics.observe_store_error()
            logger.warning("response store size unavailable: %s", type(e).__name__)
    try:
        ctx.metrics.update_engine_stats(await asyncio.wait_for(ctx.client.stats(), ctx.config.health_timeout_s))
    except Exception as e:  # request metrics are still worth scraping
        logger.warning("engine stats unavailable: %s", type(e).__name__)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str
    endpoint: Callable
    summary: str
    response_model: Any = None


ROUTES = (
    RouteSpec("POST", "/v1/chat/completions", chat_completions, "Chat completion (harmony reasoning, tool calls, SSE)",
              ChatCompletionResponse),
    RouteSpec("POST", "/v1/completions", completions, "Text completion from text or token ids", CompletionResponse),
    RouteSpec("POST", "/v1/responses", create_response, "Responses API (harmony items, stored conversations, SSE)",
              ResponseObject),
    RouteSpec("GET", "/v1/responses/{response_id}", retrieve_response, "A stored response", ResponseObject),
    RouteSpec("DELETE", "/v1/responses/{response_id}", delete_response, "Delete a stored response", DeletedResponse),
    RouteSpec("GET", "/v1/responses/{response_id}/input_items", list_input_items, "A stored response's input items",
              InputItemList),
    RouteSpec("POST", "/v1/responses/{response_id}/cancel", cancel_response, "Cancel a background response",
              ResponseObject),
    RouteSpec("GET", "/v1/models", list_models, "The served model, once per served name", ModelList),
    RouteSpec("GET", "/v1/models/{model_id}", retrieve_model, "One served model name (404 if unknown)", ModelCard),
    RouteSpec("POST", "/tokenize", tokenize_route, "Token ids of a prompt or a chat (vLLM's shape)",
              TokenizeResponse),
    RouteSpec("POST", "/detokenize", detokenize_route, "Text of token ids (vLLM's shape)", DetokenizeResponse),
    RouteSpec("GET", "/tokenizer_info", tokenizer_info_route, "The tokenizer's special tokens (vLLM's shape)"),
    RouteSpec("GET", "/version", version_route, "The server's version", VersionResponse),
    RouteSpec("GET", "/health", health, "200 when the engine answers, else 503 (no API key needed)"),
    RouteSpec("GET", "/metrics", metrics, "Prometheus metrics (vLLM names)"),
)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)}


class GuardMiddleware:
    """API key and body size, checked before FastAPI parses anything (plain ASGI, so
    streaming and client disconnects pass through untouched)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"] != "/health":  # CORS preflights never get here (CORSMiddleware answers)
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = headers.get("content-length", "")
        too_big = error_response(413, f"request body exceeds {self.max_body_bytes} bytes", code="body_too_large")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await too_big(scope, receive, send)
        body, more = b"", True
        while more:  # read (at most the limit) now, then replay, so chunked bodies are bounded too
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await too_big(scope, receive, send)
        replayed = False
        # Every body this API takes is JSON: read it as JSON whatever the client declared
        # (`curl -d` sends application/x-www-form-urlencoded), so the error, if any, is about the JSON.
        scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                     + [(b"content-type", b"application/json")])

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: disconnect notifications

        await self.app(scope, replay, send)


def build_api(ctx: ServingContext) -> FastAPI:
    app = FastAPI(title="gptoss-ray", description="OpenAI-compatible API for gpt-oss models", version="0.1.0")
    app.state.ctx = ctx
    app.state.responses = ResponsesService(ctx, open_store(ctx.config.responses_store), ctx.config.responses_ttl_s)
    for route in ROUTES:
        app.add_api_route(route.path, route.endpoint, methods=[route.method], summary=route.summary,
                          response_model=route.response_model, responses=_ERRORS)
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, api_key=ctx.config.api_key, max_body_bytes=ctx.config.max_body_bytes)
    if ctx.config.allowed_origins:  # added last, so outermost: its headers reach 401 and 413 answers too
        app.add_middleware(CORSMiddleware, allow_origins=ctx.config.allowed_origins, allow_credentials=True,
                           allow_methods=["*"], allow_headers=["*"])
    return app


@serve.ingress()
class OpenAIIngress:
    """Serve deployment: the FastAPI app over a handle to the LLMServer deployment."""

    def __init__(self, server: Any, config: dict):
        cfg = ServeConfig.model_validate(config)
        install_log_level(cfg.log_level)
        self.ctx = ServingContext(config=cfg, client=HandleClient(server), metrics=ServingMetrics(cfg.model_name))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.ctx)
