"""A held load on the real server (`gptoss-ray serve`, demo checkpoint, a real Ray cluster):
256 requests at concurrency 32 mixing streamed, non-streamed, aborted (the client hangs
up mid-stream) and invalid requests. Nothing may be lost or leaked:
- no 5xx and no error event in any stream;
- every valid request completes with exact usage (prompt tokens = the rendered harmony
  prompt, completion tokens = max_tokens when min_tokens / ignore_eos pin the length);
- every invalid request gets its own 4xx;
- afterwards no request is running or waiting, the KV cache holds no block, and the
  server still answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.servers import server_process

from gptoss_ray.harmony.render import render_chat
from gptoss_ray.serve.testing import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL = "load-test"
MAX_MODEL_LEN = 512
NUM_REQUESTS = 256
CONCURRENCY = 32
# One request of each kind per 8, in this order (i % 8).
KINDS = ("stream", "stream", "stream", "stream_natural", "plain", "plain", "abort", "invalid")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "gptoss_ray.cli", "serve", "--port", str(port), "--served-model-name", MODEL,
           "--device", "cpu", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
           "--num-cpus", "4", "--worker-num-cpus", "0.1"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Own session: the teardown signal reaches the CLI, which shuts Serve and Ray down.
    with server_process(cmd, port, log, env) as base:
        yield base


@dataclass
class Outcome:
    kind: str
    status: int | None = None  # HTTP status (None: the client hung up before headers mattered)
    finish_reason: str | None = None
    usage: dict | None = None
    max_tokens: int = 0
    expected_prompt_tokens: int = 0
    expected_status: int | None = None  # invalid requests only
    stream_errors: list = field(default_factory=list)  # error events inside a 200 stream
    done: bool = False  # a stream ended with [DONE]


def _messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"request {i}: " + "tell me about the sea " * (1 + i % 5)}]


def _valid_body(i: int, stream: bool, fixed: bool = True) -> dict:
    k = 1 + i % 12
    body = {"model": MODEL, "messages": _messages(i), "max_tokens": k, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if fixed:
        body |= {"min_tokens": k, "ignore_eos": True}
    return body


def _invalid_request(i: int) -> tuple[dict | str, int]:
    """(body, expected status), one of several ways to be wrong."""
    good = _valid_body(i, stream=i % 2 == 0)
    cases = [
        (good | {"max_tokens": 0}, 400),
        (good | {"temperature": 3.5}, 400),
        (good | {"messages": []}, 400),
        ("{not json", 400),
        (good | {"model": "no-such-model"}, 404),
        (good | {"min_tokens": 50, "max_tokens": 5}, 400),
        (good | {"messages": [{"role": "user", "content": "sea " * (2 * MAX_MODEL_LEN)}]}, 400),
    ]
    return cases[(i // len(KINDS)) % len(cases)]


async def _stream(client: httpx.AsyncClient, url: str, body: dict, out: Outcome, hang_up_after: int | None) -> None:
    async with client.stream("POST", url, json=body) as resp:
        out.status = resp.status_code
        if resp.status_code != 200:
            await resp.aread()
            return
        events = 0
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            if hang_up_after is not None and events >= hang_up_after:
                return  # leaving the context closes the connection mid-stream
            events += 1
            data = line[5:].strip()
            if data == "[DONE]":
                out.done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                out.stream_errors.append(chunk["error"])
            for choice in chunk.get("choices") or ():
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
            out.usage = chunk.get("usage") or out.usage


async def _one(client: httpx.AsyncClient, base: str, i: int) -> Outcome:
    kind = KINDS[i % len(KINDS)]
    url = f"{base}/v1/chat/completions"
    out = Outcome(kind, max_tokens=1 + i % 12,
                  expected_prompt_tokens=len(render_chat(_messages(i), reasoning_effort="medium").token_ids))
    if kind == "invalid":
        body, out.expected_status = _invalid_request(i)
        content = body if isinstance(body, str) else json.dumps(body)
        resp = await client.post(url, content=content, headers={"Content-Type": "application/json"})
        out.status = resp.status_code
    elif kind == "abort":
        body = _valid_body(i, stream=True) | {"max_tokens": 200, "min_tokens": 200}
        await _stream(client, url, body, out, hang_up_after=(i // len(KINDS)) % 3)
    elif kind == "plain":
        resp = await client.post(url, json=_valid_body(i, stream=False))
        out.status = resp.status_code
        if resp.status_code == 200:
            reply = resp.json()
            out.finish_reason, out.usage = reply["choices"][0]["finish_reason"], reply["usage"]
    else:
        await _stream(client, url, _valid_body(i, stream=True, fixed=kind == "stream"), out, hang_up_after=None)
    return out


async def _run_load(base: str) -> list[Outcome]:
    gate = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300)) as client:

        async def gated(i: int) -> Outcome:
            async with gate:
                return await _one(client, base, i)

        return await asyncio.gather(*(gated(i) for i in range(NUM_REQUESTS)))


GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "gptoss:ingress_requests_inflight")
GENERATED = "vllm:generation_tokens_total"


def _metrics(base: str, wanted: tuple[str, ...]) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name in wanted}


def test_held_load_loses_and_leaks_nothing(server):
    generated_before = _metrics(server, (GENERATED,)).get(GENERATED, 0.0)
    outcomes = asyncio.run(_run_load(server))

    server_errors = [(o.kind, o.status) for o in outcomes if o.status is not None and o.status >= 500]
    assert server_errors == []
    assert [o.stream_errors for o in outcomes if o.stream_errors] == []

    for o in outcomes:
        if o.kind == "invalid":
            assert o.status == o.expected_status, o
        elif o.kind in ("stream", "stream_natural", "plain"):
            assert o.status == 200, o
            assert o.usage is not None and o.usage["prompt_tokens"] == o.expected_prompt_tokens, o
            n = o.usage["completion_tokens"]
            assert o.usage["total_tokens"] == o.usage["prompt_tokens"] + n, o
            if o.kind == "stream_natural" and o.finish_reason == "stop":  # a stop token came first
                assert 1 <= n <= o.max_tokens, o
            else:
                assert n == o.max_tokens and o.finish_reason == "length", o
            if o.kind != "plain":
                assert o.done, o
        else:  # aborted: the server accepted it; what it sent before the hang-up is not checked
            assert o.status == 200, o

    # Aborted requests are freed when the server notices the hang-up: wait (bounded) for
    # the engine to drain, then nothing may remain.
    deadline = time.monotonic() + 60
    gauges = _metrics(server, GAUGES)
    while time.monotonic() < deadline and any(gauges.values()):
        time.sleep(0.5)
        gauges = _metrics(server, GAUGES)
    assert gauges == dict.fromkeys(GAUGES, 0.0)

    # The hang-ups stopped generation: an aborted request that ran to its 200 tokens would
    # also drain in the end, so count what was generated for them.
    valid_tokens = sum(o.usage["completion_tokens"] for o in outcomes if o.usage and o.kind != "abort")
    aborted = [o for o in outcomes if o.kind == "abort"]
    aborted_tokens = _metrics(server, (GENERATED,))[GENERATED] - generated_before - valid_tokens
    assert 0 <= aborted_tokens < len(aborted) * 200 / 2

    after = httpx.post(f"{server}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": _messages(0), "max_tokens": 3, "min_tokens": 3,
                             "ignore_eos": True})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 3
