"""`gptoss-ray bench` against a small deterministic OpenAI-compatible server run in-process.

The server streams `max_tokens` one-word chunks, counts requests in flight, records the
bodies it got, and can fail every k-th request with a chosen status: enough to check the
load generator's counting, its concurrency gate, its error accounting and its JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptoss_ray.cli import main as cli_main
from gptoss_ray.serve.testing import free_port

MODEL = "fake-model"


class FakeServer:
    """Settings are plain attributes so that one server serves every test."""

    def __init__(self):
        self.bodies: list[dict] = []  # every chat request body received
        self.failures: list[int] = []  # status codes to answer in turn, cycled; 200 = serve it
        self.send_usage = True  # honour stream_options.include_usage
        self.error_event_after: int | None = None  # send an error event after this many tokens
        self.auth: list[str | None] = []  # Authorization header of every chat request
        self.token_delay_s = 0.002  # between chunks, so that requests overlap
        self.in_flight = 0
        self.max_in_flight = 0
        self.app = self._build_app()

    def reset(self) -> None:
        self.__init__()

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.bodies.append(body)
            self.auth.append(request.headers.get("authorization"))
            if self.failures:
                status = self.failures[(len(self.bodies) - 1) % len(self.failures)]
                if status != 200:
                    return JSONResponse({"error": {"message": "injected", "code": status}}, status_code=status)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            self.bodies.append(body)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        return app

    async def _stream(self, body: dict):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            n, chat = body["max_tokens"], "messages" in body
            if chat:
                yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            for i in range(n):
                if i == self.error_event_after:
                    yield _sse({"error": {"message": "engine died", "type": "internal_server_error", "code": 500}})
                    return
                await asyncio.sleep(self.token_delay_s)
                piece = {"delta": {"content": f"w{i} "}} if chat else {"text": f"w{i} "}
                yield _sse({"choices": [{"index": 0, **piece}]})
            yield _sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            if self.send_usage and body.get("stream_options", {}).get("include_usage"):
                prompt = body["messages"][0]["content"] if chat else body["prompt"]
                prompt_tokens = len(prompt.split()) + 7
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                yield _sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@pytest.fixture(scope="module")
def server():
    fake = FakeServer()
    port = free_port()
    # The app object stays the same across reset(): routes read `fake`'s attributes.
    uv = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    fake.base_url = f"http://127.0.0.1:{port}"
    yield fake
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def fake(server):
    base_url = server.base_url
    server.reset()
    server.base_url = base_url
    return server


def bench(fake: FakeServer, tmp_path, *extra: str, rc: int = 0) -> dict:
    out = tmp_path / "out.json"
    argv = ["bench", "--base-url", fake.base_url, "--output", str(out), "--no-progress", *extra]
    assert cli_main(argv) == rc
    return json.loads(out.read_text())


def test_sweep_reports_every_metric_with_exact_token_counts(fake, tmp_path):
    report = bench(fake, tmp_path, "--concurrency", "1,4", "--num-requests", "8",
                   "--input-len", "10", "--output-len", "5", "--warmup", "1")
    assert [r["concurrency"] for r in report["runs"]] == [1, 4]
    for run in report["runs"]:
        assert run["completed"] == 8 and run["errors"] == 0 and run["errors_by_status"] == {}
        assert run["total_output_tokens"] == 40 and run["usage_reported"] is True
        assert run["total_input_tokens"] == 8 * (10 + 7)  # from the server's usage, not the estimate
        for metric in ("ttft", "itl", "tpot", "e2e_latency"):
            values = [run[f"{metric}_p{p}_ms"] for p in (50, 90, 99)]
            assert all(v > 0 for v in values) and values == sorted(values)
        assert run["ttft_p50_ms"] <= run["e2e_latency_p50_ms"]
        assert run["output_throughput_tok_s"] > 0 and run["request_throughput_req_s"] > 0
    for key in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "output_throughput_tok_s", "errors"):
        assert key in report
    assert report["model"] == MODEL  # discovered from GET /v1/models
    assert report["concurrency"] == 4 and report["errors"] == 0  # top level = the last load point
    assert 2 <= fake.max_in_flight <= 4  # the gate holds at 4 and requests do overlap

    warm, timed = fake.bodies[0], fake.bodies[1:]
    assert len(timed) == 16 and warm["messages"] not in [b["messages"] for b in timed]
    prompts = [b["messages"][0]["content"] for b in timed]
    assert not set(prompts[:8]) & set(prompts[8:])  # each load point has fresh prompts
    for body in timed:
        assert body["model"] == MODEL and body["stream"] is True
        assert body["max_tokens"] == 5 and body["min_tokens"] == 5 and body["ignore_eos"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert len(body["messages"][0]["content"].split()) == 10


def test_failures_are_counted_by_status_code(fake, tmp_path):
    fake.failures = [200, 500, 200, 429]
    report = bench(fake, tmp_path, "--concurrency", "3", "--num-requests", "12", "--output-len", "3",
                   "--input-len", "4", "--warmup", "0")
    assert report["errors"] == 6 and report["completed"] == 6
    assert report["errors_by_status"] == {"429": 3, "500": 3}
    assert report["total_output_tokens"] == 18  # failed requests add no tokens


def test_error_event_inside_a_200_stream_is_a_failure(fake, tmp_path):
    fake.error_event_after = 2
    report = bench(fake, tmp_path, "--num-requests", "3", "--output-len", "4", "--input-len", "3", "--warmup", "0",
                   rc=1)  # nothing completed: a failure, not a result
    assert report["completed"] == 0 and report["errors_by_status"] == {"stream_error_500": 3}
    assert report["ttft_p50_ms"] is None and report["output_throughput_tok_s"] == 0


def test_poisson_arrivals_with_progress_bar(fake, tmp_path, capsys):
    out = tmp_path / "poisson.json"
    argv = ["bench", "--base-url", fake.base_url, "--request-rate", "200", "--concurrency", "8",
            "--num-requests", "10", "--output-len", "2", "--input-len", "3", "--warmup", "0", "--output", str(out)]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["request_rate"] == 200.0 and report["completed"] == 10 and report["errors"] == 0
    captured = capsys.readouterr()
    assert "concurrency=8 rate=200/s:" in captured.err and "/10 [" in captured.err  # tqdm's bar on stderr
    assert "ttft p50" in captured.out  # the summary table on stdout


def test_without_usage_tokens_are_counted_from_chunks(fake, tmp_path):
    fake.send_usage = False
    report = bench(fake, tmp_path, "--num-requests", "3", "--output-len", "6", "--input-len", "4",
                   "--warmup", "0", "--model", "any", "--no-fixed-length", "--api-key", "sk-test")
    assert report["usage_reported"] is False and report["total_output_tokens"] == 18
    assert report["total_input_tokens"] == 12  # the word estimate
    assert all("min_tokens" not in b and "ignore_eos" not in b and b["model"] == "any" for b in fake.bodies)
    assert fake.auth == ["Bearer sk-test"] * 3


def test_raw_completions_endpoint(fake, tmp_path):
    fake.send_usage = False  # tokens are then counted from `choices[].text` chunks
    report = bench(fake, tmp_path, "--endpoint", "completions", "--num-requests", "4", "--output-len", "5",
                   "--input-len", "6", "--warmup", "0")
    assert report["endpoint"] == "completions" and report["completed"] == 4
    assert report["total_output_tokens"] == 20 and report["itl_p50_ms"] > 0
    assert all("messages" not in b and len(b["prompt"].split()) == 6 for b in fake.bodies)


def test_sharegpt_dataset_prompts_and_reply_lengths(fake, tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "tell me a story"}, {"from": "gpt", "value": "once upon a"}]},
        {"conversations": [{"from": "gpt", "value": "no human turn here"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    report = bench(fake, tmp_path, "--dataset", str(path), "--num-requests", "4", "--warmup", "0")
    assert report["completed"] == 4 and report["total_output_tokens"] == 2 * 3 + 2 * 2
    prompts = sorted(b["messages"][0]["content"] for b in fake.bodies)
    assert prompts == ["hi", "hi", "tell me a story", "tell me a story"]  # 2 usable entries, each reused
    assert sorted(b["max_tokens"] for b in fake.bodies) == [2, 2, 3, 3]  # the replies' word counts


def test_plot_is_written(fake, tmp_path):
    plot = tmp_path / "plot.png"
    bench(fake, tmp_path, "--concurrency", "1,2", "--num-requests", "3", "--output-len", "3",
          "--input-len", "3", "--warmup", "0", "--plot", str(plot))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concurrency", "0"], "--concurrency values must be positive"),
        (["--concurrency", "two"], "--concurrency must be a comma list of ints"),
        (["--request-rate", "-1"], "--request-rate values must be positive"),
        (["--num-requests", "0"], "--num-requests must be positive"),
        (["--output-len", "0"], "--output-len must be positive"),
        (["--extra-body", "[1]"], "--extra-body must be a JSON object"),
        (["--dataset", "/nonexistent/sharegpt.json"], "no such file"),
    ],
)
def test_bad_arguments_give_one_clear_line(fake, args, message, capsys):
    assert cli_main(["bench", "--base-url", fake.base_url, "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert fake.bodies == []  # nothing was sent


def test_benchmarks_script_is_the_same_command():
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_load.py"
    proc = subprocess.run([sys.executable, str(script), "--base-url", "http://127.0.0.1:1", "--concurrency", "x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gptoss-ray bench: error: --concurrency must be a comma list of ints, got 'x'"


def test_bad_base_url_and_dead_server(capsys):
    assert cli_main(["bench", "--base-url", "localhost:8000"]) == 2
    assert "--base-url must look like http://HOST:PORT/v1" in capsys.readouterr().err
    assert cli_main(["bench", "--base-url", f"http://127.0.0.1:{free_port()}", "--warmup", "0"]) == 2
    assert "is the server up?" in capsys.readouterr().err


def test_every_request_failing_names_the_status_and_exits_non_zero(fake, tmp_path, capsys):
    fake.failures = [401]
    argv = ["bench", "--base-url", fake.base_url, "--no-progress", "--num-requests", "4", "--output-len", "2",
            "--input-len", "3", "--model", MODEL]
    assert cli_main([*argv, "--warmup", "0", "--output", str(tmp_path / "out.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gptoss-ray bench: error: every request failed (status 401 x4); the server wants an API key: "
                   "pass --api-key (or the right one)"]
    assert json.loads((tmp_path / "out.json").read_text())["errors"] == 4  # the report is still written
    assert cli_main([*argv, "--warmup", "1"]) == 2  # the warm-up says it first
    err = capsys.readouterr().err
    assert "failed with status 401; the server wants an API key" in err and "is the server up" not in err


def test_a_401_from_models_is_named(tmp_path, capsys):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return JSONResponse({"error": {"message": "no key"}}, status_code=401)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        assert cli_main(["bench", "--base-url", f"http://127.0.0.1:{port}/v1", "--warmup", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "answered 401; the server wants an API key" in err and "lists no model" not in err
    finally:
        server.should_exit = True
        thread.join(timeout=30)
