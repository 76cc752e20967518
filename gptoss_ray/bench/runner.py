"""Send a workload at one load point: a fixed concurrency, optionally with Poisson arrivals.

Closed loop (no rate): N clients each send their next request when the previous one
ends, which measures the server at a steady N in flight. Open loop (a rate R): requests
arrive with exponential gaps of mean 1/R whatever the server does, as real users do;
the concurrency then only caps how many are in flight.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from gptoss_ray.bench.client import ENDPOINTS, RequestResult, request_body, send_request
from gptoss_ray.bench.stats import summarize
from gptoss_ray.bench.workload import BenchRequest


@dataclass(frozen=True)
class Target:
    """Where and how to send requests; the same for every load point of a sweep."""

    base_url: str  # ends with /v1
    endpoint: str  # "chat" or "completions"
    model: str  # the `model` field of each request
    api_key: str | None  # sent as a bearer token when set
    fixed_length: bool  # send min_tokens / ignore_eos so the output length is exact
    extra_body: dict  # merged into every request body last (overrides the above)
    timeout_s: float  # per request, connect to last byte

    @property
    def url(self) -> str:
        return self.base_url + ENDPOINTS[self.endpoint]

    def body(self, req: BenchRequest) -> dict:
        return request_body(self.endpoint, self.model, req, self.fixed_length, self.extra_body)


@dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep."""

    concurrency: int  # most requests in flight
    request_rate: float | None  # Poisson arrivals per second; None = closed loop
    seed: int = 0  # for the arrival gaps


def make_client(target: Target, concurrency: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    # One pooled connection per in-flight request: connection setup must not be what
    # limits the concurrency under test.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(target.timeout_s))


async def run_load_point(
    target: Target, point: LoadPoint, requests: list[BenchRequest], show_progress: bool = True
) -> dict:
    """Send all `requests` at `point`; return `summarize(...)` plus the point's settings."""
    rng = random.Random(point.seed)
    gate = asyncio.Semaphore(point.concurrency)
    bar = tqdm(total=len(requests), desc=_label(point), unit="req", disable=not show_progress, leave=False)

    async with make_client(target, point.concurrency) as client:

        async def one(req: BenchRequest) -> RequestResult:
            async with gate:
                result = await send_request(client, target.url, target.body(req), req.prompt_len)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for req in requests:
            if point.request_rate is not None and tasks:
                await asyncio.sleep(rng.expovariate(point.request_rate))
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    return {"concurrency": point.concurrency, "request_rate": point.request_rate} | summarize(results, duration)


async def warm_up(target: Target, requests: list[BenchRequest]) -> list[RequestResult]:
    """Send `requests` one at a time and drop the timings: first-request costs (lazy
    loading, compilation, allocator growth) are not what a load point measures."""
    async with make_client(target, 1) as client:
        return [await send_request(client, target.url, target.body(r), r.prompt_len) for r in requests]


async def fetch_first_model(base_url: str, api_key: str | None, timeout_s: float) -> str | None:
    """The first id of GET {base_url}/models, or None when the server does not list any
    (httpx.HTTPStatusError when it answers with an error status)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers, timeout=timeout_s) as client:
        resp = await client.get(f"{base_url}/models")
        resp.raise_for_status()  # a 401 is a wrong key, not a server without models
        data = resp.json().get("data") or []
        return data[0].get("id") if data else None


def _label(point: LoadPoint) -> str:
    rate = f" rate={point.request_rate:g}/s" if point.request_rate is not None else ""
    return f"concurrency={point.concurrency}{rate}"
