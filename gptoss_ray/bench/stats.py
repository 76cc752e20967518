"""Turn the per-request results of one run into the numbers a report shows."""

from __future__ import annotations

from collections import Counter

import numpy as np

from gptoss_ray.bench.client import RequestResult

PERCENTILES = (50, 90, 99)


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    """Metrics of one run under plain JSON keys: `ttft_p50_ms`, `itl_p99_ms`,
    `e2e_latency_p90_ms`, `output_throughput_tok_s`, `errors`, `errors_by_status`, ...

    Latency percentiles cover completed requests only; throughput counts their tokens
    over the wall time of the whole run (first send to last reply)."""
    done = [r for r in results if r.ok]
    failed = Counter(r.error or "unknown" for r in results if not r.ok)
    out_tokens = sum(r.output_tokens for r in done)
    metrics: dict = {
        "num_requests": len(results),
        "completed": len(done),
        "errors": sum(failed.values()),
        "errors_by_status": dict(sorted(failed.items())),
        "duration_s": round(duration_s, 4),
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": out_tokens,
        "request_throughput_req_s": _rate(len(done), duration_s),
        "output_throughput_tok_s": _rate(out_tokens, duration_s),
        "usage_reported": bool(done) and all(r.usage_reported for r in done),
    }
    metrics |= _latency_keys("ttft", [r.ttft_s for r in done if r.ttft_s is not None])
    metrics |= _latency_keys("itl", [gap for r in done for gap in r.itls_s])
    metrics |= _latency_keys("tpot", [r.tpot_s for r in done if r.tpot_s is not None])
    metrics |= _latency_keys("e2e_latency", [r.e2e_s for r in done if r.e2e_s is not None])
    return metrics


def _rate(count: float, duration_s: float) -> float:
    return round(count / duration_s, 4) if duration_s > 0 else 0.0


def _latency_keys(name: str, values_s: list[float]) -> dict:
    """`{name}_mean_ms` and `{name}_p{50,90,99}_ms`; None when there are no samples
    (e.g. ITL for one-token replies), so a missing measurement never reads as zero."""
    if not values_s:
        return {f"{name}_mean_ms": None} | {f"{name}_p{p}_ms": None for p in PERCENTILES}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    out = {f"{name}_mean_ms": round(float(ms.mean()), 3)}
    for p, v in zip(PERCENTILES, np.percentile(ms, PERCENTILES)):
        out[f"{name}_p{p}_ms"] = round(float(v), 3)
    return out
