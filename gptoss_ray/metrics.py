"""Prometheus metrics, named like vLLM's (`vllm:*`, label `model_name`) so that existing
vLLM Grafana dashboards and alerts work unchanged; gpt-oss specifics are `gptoss:*`.

Request metrics (latencies, token counts, finish reasons) are observed where requests
pass, in the ingress. Engine state (queue lengths, KV usage, preemptions, expert load)
is read from `engine.stats()` (an EngineStats) when /metrics is scraped. Each `ServingMetrics` has its
own registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gptoss_ray.engine_api import EngineStats

# vLLM's buckets, so that dashboards' histogram_quantile panels match
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# Each endpoint names its requests with its own OpenAI id prefix; the label comes from it,
# so the one place that observes request metrics (ServingContext.generate) needs no more.
ENDPOINT_PREFIXES = (("chatcmpl-", "chat"), ("cmpl-", "completions"), ("resp_", "responses"))


def endpoint_of(request_id: str) -> str:
    return next((name for prefix, name in ENDPOINT_PREFIXES if request_id.startswith(prefix)), "other")


class ServingMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.model_name = model_name
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, ["model_name"]
        # Request counters and latencies also carry `endpoint` (chat, completions, responses):
        # vLLM's dashboards sum over labels they do not name, so they keep working.
        e = m + ["endpoint"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", e, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", e, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to last token.", e, buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.", e + ["finished_reason"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch.", m, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", m, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).", m, registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted for KV space.", m, registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", m, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m, registry=r)
        self.inflight = Gauge("gptoss:ingress_requests_inflight", "Requests admitted by this ingress and not finished.", m, registry=r)
        self.aborted = Counter("gptoss:requests_aborted", "Requests aborted mid-way (client gone, error).", m, registry=r)
        self.rejected = Counter("gptoss:requests_rejected", "Requests refused because the queue was full.", m, registry=r)
        self.expert_load = Gauge("gptoss:expert_load_tokens", "Tokens routed to each expert (cumulative).", m + ["layer", "expert"], registry=r)
        self.store_size = Gauge("gptoss:responses_store_size", "Responses held by the response store (read at scrape).", m, registry=r)
        self.store_errors = Counter("gptoss:responses_store_errors", "Response store queries that failed.", m, registry=r)
        self._last: dict[str, float] = {}  # last cumulative engine counters, to increment by the difference

    def labels(self, metric: Any, **extra: str) -> Any:
        return metric.labels(model_name=self.model_name, **extra)

    # --- per request ---------------------------------------------------------------

    def observe_first_token(self, seconds: float, endpoint: str) -> None:
        self.labels(self.ttft, endpoint=endpoint).observe(seconds)

    def observe_tokens(self, num_tokens: int, seconds_since_last: float | None, endpoint: str) -> None:
        self.labels(self.generation_tokens).inc(num_tokens)
        if seconds_since_last is not None and num_tokens > 0:
            for _ in range(num_tokens):  # a step that yields k tokens spreads its time over them
                self.labels(self.itl, endpoint=endpoint).observe(seconds_since_last / num_tokens)

    def observe_finished(self, finish_reason: str, seconds: float, num_prompt_tokens: int,
                         endpoint: str) -> None:
        self.labels(self.request_success, endpoint=endpoint, finished_reason=finish_reason).inc()
        self.labels(self.e2e, endpoint=endpoint).observe(seconds)
        self.labels(self.prompt_tokens).inc(num_prompt_tokens)

    def observe_store_error(self) -> None:
        self.labels(self.store_errors).inc()

    # --- engine state ----------------------------------------------------------------

    def update_engine_stats(self, stats: EngineStats) -> None:
        self.labels(self.running).set(stats.num_running)
        self.labels(self.waiting).set(stats.num_waiting)
        self.labels(self.kv_usage).set(stats.kv_usage)
        for key, value, counter in (("num_preemptions", stats.num_preemptions, self.preemptions),
                                    ("prefix_cache_queries", stats.prefix_cache_queries, self.prefix_queries),
                                    ("prefix_cache_hits", stats.prefix_cache_hits, self.prefix_hits)):
            delta = value - self._last.get(key, 0.0)
            if delta > 0:  # an engine restart resets its counters; ours stay monotonic
                self.labels(counter).inc(delta)
            self._last[key] = float(value)
        for layer, counts in enumerate(stats.expert_load or []):
            for expert, count in enumerate(counts):
                self.labels(self.expert_load, layer=str(layer), expert=str(expert)).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
