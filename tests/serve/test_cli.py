"""`gptoss-ray serve` end to end: the command starts Ray and the app, answers the openai
client with its API key, and stops cleanly on SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from gptoss_ray.serve.testing import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "gptoss_ray.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    for flag in ("--model", "--ep-size", "--host", "--port", "--api-key", "--api-key-file"):
        assert flag in out.stdout


def test_serve_command_answers_and_stops(tmp_path):
    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text("cli-key\n")
    cmd = [sys.executable, "-m", "gptoss_ray.cli", "serve", "--engine-cls", "gptoss_ray.serve.testing:ScriptedEngine",
           "--served-model-name", "m", "--port", str(port), "--api-key-file", str(key_file), "--num-cpus", "2"]
    env = {k: v for k, v in os.environ.items() if k != "GPTOSS_RAY_API_KEY"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 180  # bounds a hang while Ray starts
        while time.monotonic() < end and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        client = openai.OpenAI(base_url=url + "/v1", api_key="cli-key", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Hello from the scripted engine!"
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output[-3000:]
        assert f"serving 'm' at http://127.0.0.1:{port}/v1 (API key required)" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags,expected", [([], None), (["--dequantize-experts"], True),
                                            (["--no-dequantize-experts"], False)])
def test_expert_unpacking_flag_is_auto_on_or_off(flags, expected):
    import argparse

    from gptoss_ray.serve.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(flags)).engine.dequantize_experts is expected
