"""`gptoss-ray bench`: load-test any OpenAI-compatible chat endpoint.

    gptoss-ray bench --base-url http://127.0.0.1:8000/v1 --concurrency 1,4,16 \\
        --num-requests 64 --input-len 128 --output-len 64 --output out.json --plot out.png

Each load point sends the same workload (streamed chat completions, or raw-text
completions with --endpoint completions) and reports time to
first token, inter-token latency, time per output token and end-to-end latency (mean,
p50, p90, p99), output tokens/s, requests/s and failures by status code. The JSON holds
`runs` (one entry per load point) and, at the top level, the metrics of the last (the
heaviest) load point with `errors` summed over all of them. Modelled on vLLM's
benchmark_serving, with the same metric names where they overlap.

TTFT is the arrival of the first chunk that carries text. A gpt-oss chat server sends
nothing while the model writes its harmony header (`<|channel|>final<|message|>`, a few
tokens with real weights); random-weight demo checkpoints never write one, so their chat
TTFT includes however long the server's parser waits before giving up. Raw completions
(--endpoint completions) have no header: use them to time a random-weight model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from pathlib import Path

from gptoss_ray.bench.runner import LoadPoint, Target, fetch_first_model, run_load_point, warm_up
from gptoss_ray.bench.workload import BenchRequest, sharegpt_requests, synthetic_requests
from gptoss_ray.errors import GptOssError

_DEFAULT_OUTPUT_LEN = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True,
                        help="the endpoint as for the openai SDK, e.g. http://127.0.0.1:8000/v1 (/v1 added if no path)")
    parser.add_argument("--model", default=None, help="the request's model field (default: first of GET /models)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--concurrency", default="1",
                        help="most requests in flight; a comma list (1,4,16) sweeps (default 1)")
    parser.add_argument("--request-rate", default=None,
                        help="Poisson arrivals per second (a comma list sweeps); default: closed loop")
    parser.add_argument("--num-requests", type=int, default=32, help="requests per load point (default 32)")
    parser.add_argument("--input-len", type=int, default=128, help="synthetic prompt length in words ~ tokens")
    parser.add_argument("--output-len", type=int, default=None,
                        help=f"max_tokens per request (default {_DEFAULT_OUTPUT_LEN}; with --dataset: the reply's length)")
    parser.add_argument("--endpoint", choices=("chat", "completions"), default="chat",
                        help="chat: /chat/completions (default); completions: raw-text /completions, no chat template")
    parser.add_argument("--dataset", default=None, help="ShareGPT-style JSON file instead of synthetic prompts")
    parser.add_argument("--no-fixed-length", dest="fixed_length", action="store_false",
                        help="do not send min_tokens / ignore_eos (for servers that reject them)")
    parser.add_argument("--extra-body", default=None, help="JSON object merged into every request body")
    parser.add_argument("--warmup", type=int, default=2, help="untimed requests sent first, one at a time (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrival gaps")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write a latency vs throughput PNG here (needs matplotlib)")
    parser.add_argument("--label", default=None, help="the series name in the plot (default: the model)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    base_url = _normalize_base_url(args.base_url)
    concurrencies = _parse_list(args.concurrency, int, "--concurrency")
    rates = _parse_list(args.request_rate, float, "--request-rate") if args.request_rate else [None]
    _check_positive(num_requests=args.num_requests, input_len=args.input_len, timeout=args.timeout,
                    output_len=1 if args.output_len is None else args.output_len)
    if args.warmup < 0:
        raise GptOssError(f"--warmup must be >= 0, got {args.warmup}")
    extra_body = _parse_extra_body(args.extra_body)
    points = [LoadPoint(c, r, args.seed) for c in concurrencies for r in rates]
    # Fresh prompts for every load point (seed + k): a server's prefix cache must not turn
    # the later points of a sweep into cache hits on the earlier points' prompts.
    workloads = [_workload(args, args.seed + k) for k in range(len(points))]
    report = asyncio.run(_run_sweep(args, base_url, extra_body, workloads, points))
    _print_table(report["runs"])
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        from gptoss_ray.bench.plot import plot_series

        plot_series({args.label or report["model"]: report["runs"]}, args.plot, title=f"{report['model']} at {base_url}")
    if not any(r["completed"] for r in report["runs"]):  # nothing measured: not a benchmark result
        by_status: dict[str, int] = {}
        for r in report["runs"]:
            for status, count in r["errors_by_status"].items():
                by_status[status] = by_status.get(status, 0) + count
        first = max(by_status, key=by_status.get) if by_status else "no_response"
        counts = ", ".join(f"{_describe(s)} x{n}" for s, n in sorted(by_status.items()))
        print(f"gptoss-ray bench: error: every request failed ({counts}); {failure_hint(first)}", file=sys.stderr)
        return 1
    return 0


async def _run_sweep(args, base_url: str, extra_body: dict, workloads: list[list[BenchRequest]], points) -> dict:
    model = args.model or await _discover_model(base_url, args.api_key, args.timeout)
    target = Target(base_url, args.endpoint, model, args.api_key, args.fixed_length, extra_body, args.timeout)
    if args.warmup:
        # Prompts of their own (a seed no load point uses): no head start for a prefix cache.
        warm = synthetic_requests(args.warmup, args.input_len, workloads[0][0].output_len, args.seed + len(points))
        failed = [r.error for r in await warm_up(target, warm) if not r.ok]
        if len(failed) == args.warmup:
            hint = "try --no-fixed-length" if failed[0] == "400" and args.fixed_length else failure_hint(failed[0])
            raise GptOssError(f"every warm-up request to {target.url} failed with {_describe(failed[0])}; {hint}")
    runs = [await run_load_point(target, p, w, args.progress) for p, w in zip(points, workloads)]
    config = {
        "base_url": base_url, "endpoint": args.endpoint, "model": model, "num_requests": args.num_requests,
        "input_len": args.input_len, "output_len": args.output_len, "dataset": args.dataset, "fixed_length": args.fixed_length,
        "warmup": args.warmup, "seed": args.seed,
    }
    return {**config, **runs[-1], "errors": sum(r["errors"] for r in runs), "runs": runs}


async def _discover_model(base_url: str, api_key: str | None, timeout_s: float) -> str:
    import httpx

    try:
        model = await fetch_first_model(base_url, api_key, timeout_s)
    except httpx.HTTPStatusError as e:
        status = str(e.response.status_code)
        raise GptOssError(f"GET {base_url}/models answered {status}; {failure_hint(status)}") from None
    except httpx.HTTPError as e:
        raise GptOssError(f"cannot reach {base_url}/models ({type(e).__name__}); is the server up?") from None
    if model is None:
        raise GptOssError(f"{base_url}/models lists no model; pass --model")
    return model


def _describe(error: str) -> str:
    return f"status {error}" if error.isdigit() else error


def failure_hint(error: str) -> str:
    """What a failure most likely means: the status code, or the exception name of a
    request that got no answer at all."""
    hints = {
        "401": "the server wants an API key: pass --api-key (or the right one)",
        "403": "the server refused the API key: pass the right --api-key",
        "404": "no such route or model: check --base-url, --endpoint and --model",
        "413": "the prompts are larger than the server accepts: lower --input-len",
        "429": "the server is at capacity: lower --concurrency",
        "400": "the server rejected the requests: see its error message (try curl with one request)",
    }
    if error in hints:
        return hints[error]
    if error.isdigit():
        return "see the server's log"
    if error.startswith("stream_error"):
        return "the server failed mid-stream: see its log"
    return "is the server up?"


def _workload(args, seed: int) -> list[BenchRequest]:
    if args.dataset:
        return sharegpt_requests(args.dataset, args.num_requests, args.output_len, seed)
    output_len = args.output_len if args.output_len is not None else _DEFAULT_OUTPUT_LEN
    return synthetic_requests(args.num_requests, args.input_len, output_len, seed)


def _normalize_base_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise GptOssError(f"--base-url must look like http://HOST:PORT/v1, got {url!r}")
    url = url.rstrip("/")
    return url if parts.path.strip("/") else f"{url}/v1"


def _parse_list(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise GptOssError(f"{flag} must be a comma list of {kind.__name__}s, got {text!r}") from None
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise GptOssError(f"{flag} values must be positive, got {text!r}")
    return values


def _check_positive(**values) -> None:
    for name, v in values.items():
        if v <= 0:
            raise GptOssError(f"--{name.replace('_', '-')} must be positive, got {v}")


def _parse_extra_body(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise GptOssError(f"--extra-body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise GptOssError("--extra-body must be a JSON object")
    return body


def _print_table(runs: list[dict]) -> None:
    cols = ("concurrency", "request_rate", "completed", "errors", "output_throughput_tok_s",
            "request_throughput_req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
            "e2e_latency_p50_ms", "e2e_latency_p99_ms")
    heads = ("conc", "rate", "ok", "err", "out tok/s", "req/s", "ttft p50", "ttft p99",
             "itl p50", "itl p99", "e2e p50", "e2e p99")
    print("  ".join(f"{h:>9}" for h in heads))
    for r in runs:
        print("  ".join(f"{_fmt(r.get(c)):>9}" for c in cols))
    for r in runs:
        if r["errors"]:
            print(f"concurrency={r['concurrency']}: errors {r['errors_by_status']}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)
