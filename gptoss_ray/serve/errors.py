"""OpenAI's error envelope, for every error the server answers.

`{"error": {"message", "type", "param", "code"}}` whatever went wrong: our own checks,
FastAPI's request validation, unknown routes and methods, and bugs (a 500 whose message
never carries a traceback or a file path; the traceback goes to the log only).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_exceeded",
    500: "internal_server_error", 503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error answered to the client as OpenAI's envelope with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    err_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def sse_error(err: OpenAIError | Exception) -> str:
    """The SSE event for an error after streaming began (the SDK raises on it)."""
    if not isinstance(err, OpenAIError):
        err = OpenAIError(500, "internal server error")
    return f"data: {json.dumps(err.body())}\n\n"


def _param_of(loc: tuple) -> str | None:
    parts = [str(x) for x in loc if x != "body"]
    # pydantic adds the union member tried (e.g. "str", "list[TextPart]") to the location
    parts = [p for p in parts if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = _param_of(tuple(first.get("loc", ())))
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "request body must be a JSON object", None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        if param is None:  # no body at all (FastAPI reports the body itself as missing)
            return "the request body is empty; send a JSON object", None
        return f"missing required parameter '{param}'", param
    if first.get("type") == "value_error" and param and f"'{param}'" in msg:
        return msg, param  # our own check, already naming the parameter
    return f"invalid value for '{param}': {msg}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def _openai(_: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "no such route", 405: "method not allowed for this route"}
        message = messages.get(exc.status_code) or (exc.detail if isinstance(exc.detail, str) else "request failed")
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
