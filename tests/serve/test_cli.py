"""`gptoss-ray serve` end to end: the command starts Ray and the app, answers the openai
client with its API key, and stops cleanly on SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from gptoss_ray.serve.testing import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "gptoss_ray.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--ep-size", "--host", "--port", "--api-key", "--api-key-file", "--served-model-name",
                 "--gpu-memory-utilization", "--allowed-origins", "--log-level", "--disable-log-requests", "MODEL"):
        assert flag in out.stdout


@contextlib.contextmanager
def serve_command(flags: list[str], env: dict | None = None) -> Iterator[tuple[str, dict]]:
    """`gptoss-ray serve` over the scripted engine on a free port; yields (base URL, a dict
    that holds the command's whole output under "output" once it stopped on SIGINT)."""
    port = free_port()
    cmd = [sys.executable, "-m", "gptoss_ray.cli", "serve", "--engine-cls", "gptoss_ray.serve.testing:ScriptedEngine",
           "--port", str(port), "--num-cpus", "2", *flags]
    env = env or {k: v for k, v in os.environ.items() if k != "GPTOSS_RAY_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True)
    reader.start()
    result: dict = {}
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 180  # bounds a hang while Ray starts
        # Ready once the command says it serves: /health can answer while `serve.run` is still
        # returning, and a Ctrl-C then is (rightly) an interrupted start-up.
        while time.monotonic() < end and proc.poll() is None and not any("gptoss-ray: serving" in ln for ln in lines):
            time.sleep(0.5)
        assert proc.poll() is None, "".join(lines)[-3000:]
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        yield url, result
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        reader.join(timeout=30)
        result["output"] = "".join(lines)
        assert proc.returncode == 0, result["output"][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_answers_and_stops(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("cli-key\n")
    # MODEL positional, as `vllm serve MODEL`; two served names
    with serve_command(["org/some-model", "--served-model-name", "m", "alias", "--api-key-file", str(key_file),
                        "--log-level", "info"]) as (url, result):
        client = openai.OpenAI(base_url=url + "/v1", api_key="cli-key", max_retries=0)
        for name in ("m", "alias"):
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
            assert reply.choices[0].message.content == "Hello from the scripted engine!"
        assert [m.id for m in client.models.list().data] == ["m", "alias"]
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
    output = result["output"]
    assert f"serving 'm' at {url}/v1 (API key required)" in output
    # --log-level INFO reached both replicas: the LLMServer's start line, the ingress's and
    # Ray Serve's per-request lines
    assert "LLMServer ready" in output
    assert "gptoss_ray.serve.engine_client: request chatcmpl-" in output
    assert "POST /v1/chat/completions 200" in output


@pytest.mark.parametrize("flags", [["--log-level", "warning"], ["--log-level", "info", "--disable-log-requests"]])
def test_per_request_logs_can_be_turned_down(flags):
    with serve_command(["--served-model-name", "m", *flags]) as (url, result):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices[0].text
    output = result["output"]
    assert "POST /v1/completions" not in output and "engine_client: request cmpl-" not in output
    # INFO still reaches the replicas unless the level says otherwise
    assert ("LLMServer ready" in output) == ("info" in flags)


@pytest.mark.parametrize("flags,expected", [([], None), (["--dequantize-experts"], True),
                                            (["--no-dequantize-experts"], False)])
def test_expert_unpacking_flag_is_auto_on_or_off(flags, expected):
    import argparse

    from gptoss_ray.serve.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(flags)).engine.dequantize_experts is expected


def serve_cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "gptoss_ray.cli", "serve", "--num-cpus", "2", *extra]


def one_line_failure(cmd: list[str], env: dict | None = None) -> str:
    """Run a serve that must fail before starting anything: non-zero, one line on stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "serving" not in out.stdout
    return lines[0]


def test_a_taken_port_is_one_line_and_non_zero():
    """Ray's proxy binds with SO_REUSEPORT, so a second server on the same port used to start
    and share the traffic: a listener with SO_REUSEPORT (as Ray's) must make serve refuse."""
    import socket

    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_failure(serve_cmd("--engine-cls", "gptoss_ray.serve.testing:ScriptedEngine",
                                          "--port", str(port)))
    assert f"port {port}" in line and "taken" in line


@pytest.mark.parametrize("args, words", [
    (["--model", "/nonexistent/checkpoint"], "no such directory"),
    (["--model", "not a hub id"], "no such directory"),
    (["--host", "256.1.1.1"], "not a valid IPv4 address"),
    (["--host", "10.255.255.254"], "not an address of this machine"),
    (["--max-model-len", "1000000"], "exceeds the model's context"),
    (["--max-model-len", "999999999"], "less than or equal"),
])
def test_bad_model_host_or_length_is_one_line_before_deploying(args, words):
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_RAY_ALLOW_LONG_MAX_MODEL_LEN"}
    line = one_line_failure(serve_cmd("--port", str(free_port()), *args), env)
    assert line.startswith("gptoss-ray serve: error:") and words in line, line


def test_a_model_that_fails_in_the_replica_is_one_line_and_non_zero():
    """The engine here raises while the replica constructs it (as a checkpoint that passes
    the pre-checks but not the load): Serve retries it, each failure a traceback Ray
    forwards to the driver; serve must still end non-zero with one line naming the cause."""
    cmd = serve_cmd("--engine-cls", "gptoss_ray.serve.testing:FailingEngine", "--port", str(free_port()))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)  # bounds Serve's retries
    assert out.returncode != 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert lines[0].startswith("gptoss-ray serve: error: the model failed to start:"), lines[0]
    assert "scripted engine failed to load its checkpoint" in lines[0] and "full log:" in lines[0], lines[0]
    assert "serving" not in out.stdout


def test_ctrl_c_while_the_model_loads_stops_promptly(tmp_path):
    """The engine here takes 10 minutes to construct; SIGINT once Ray is deploying it must
    end serve long before that (the bound below only catches a wait for the load)."""
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(serve_cmd("--engine-cls", "gptoss_ray.serve.testing:SlowLoadingEngine",
                                      "--port", str(free_port())),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + 120  # bounds Ray's start only
        while "loading" not in log.read_text() and time.monotonic() < end:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(8)  # Ray up, the replica constructing the engine
        assert proc.poll() is None, log.read_text()[-3000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)  # << the 600 s load
        assert proc.returncode != 0 and "interrupted" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
