"""One streamed chat completion against an OpenAI-compatible endpoint, timed.

Plain httpx and a hand-written server-sent-events reader rather than the openai SDK:
the SDK would add its own retries and parsing time to every measurement, and the
benchmark must also see the raw status code of each failure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from gptoss_ray.bench.workload import BenchRequest

# Delta fields that carry generated text. gpt-oss servers put the analysis channel in
# `reasoning_content` (vLLM) or `reasoning` (others); both are generated tokens.
_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


@dataclass
class RequestResult:
    """How one request went. Times are seconds since the request was sent."""

    ok: bool = False  # completed with status 200 and no error event in the stream
    error: str | None = None  # status code ("429", "500") or exception name when not ok
    ttft_s: float | None = None  # first chunk carrying generated text
    e2e_s: float | None = None  # last byte of the response
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    output_tokens: int = 0  # usage.completion_tokens if sent, else chunks carrying text
    prompt_tokens: int = 0  # usage.prompt_tokens if sent, else the workload's estimate
    usage_reported: bool = False  # whether the server sent a usage object

    @property
    def itls_s(self) -> list[float]:
        """Inter-token latencies: gaps between successive text chunks (as vLLM's benchmark
        measures them). A server that packs several tokens into a chunk shows fewer, longer
        gaps here; `tpot_s` divides by the token count instead."""
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for one-token replies."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}


def request_body(endpoint: str, model: str, req: BenchRequest, fixed_length: bool, extra_body: dict) -> dict:
    """The JSON body of one streamed request: a chat with one user message, or a raw
    text completion (no chat template, no reply parsing on the server)."""
    body = {
        "model": model,
        "max_tokens": req.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if fixed_length:
        # vLLM-style extensions: the server generates exactly max_tokens tokens, so every
        # server under test does the same work whatever its (random) weights sample.
        body["min_tokens"] = req.output_len
        body["ignore_eos"] = True
    body.update(extra_body)
    return body


async def send_request(client: httpx.AsyncClient, url: str, body: dict, prompt_len: int) -> RequestResult:
    """POST `body` (stream=True) to `url` and time its text chunks. Never raises for a failed
    request: the failure is recorded in the result, so one bad request cannot stop a run."""
    result = RequestResult(prompt_tokens=prompt_len)
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                result.error = str(resp.status_code)
                return result
            await _read_events(resp, result, start)
    except httpx.HTTPError as e:
        result.error = type(e).__name__
        return result
    result.e2e_s = time.perf_counter() - start
    if result.error is None and result.ttft_s is None and result.output_tokens == 0:
        result.error = "empty_response"
    if not result.usage_reported:
        result.output_tokens = len(result.chunk_times_s)
    result.ok = result.error is None
    return result


async def _read_events(resp: httpx.Response, result: RequestResult, start: float) -> None:
    """Consume the SSE stream into `result`: chunk arrival times, usage, error events."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter() - start
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            result.error = "bad_chunk"
            continue
        if "error" in chunk:
            err = chunk["error"]
            code = err.get("code") if isinstance(err, dict) else None
            result.error = f"stream_error_{code}" if code else "stream_error"
            continue
        usage = chunk.get("usage")
        if usage:
            result.usage_reported = True
            result.output_tokens = int(usage.get("completion_tokens") or 0)
            result.prompt_tokens = int(usage.get("prompt_tokens") or result.prompt_tokens)
        if _has_text(chunk):
            if result.ttft_s is None:
                result.ttft_s = now
            result.chunk_times_s.append(now)


def _has_text(chunk: dict) -> bool:
    for choice in chunk.get("choices") or ():
        if choice.get("text"):  # /v1/completions
            return True
        delta = choice.get("delta") or {}
        if any(delta.get(f) for f in _TEXT_FIELDS) or delta.get("tool_calls"):
            return True
    return False
