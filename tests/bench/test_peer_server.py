"""benchmarks/peer_server.py (transformers `generate` behind FastAPI) is a valid peer:
the openai SDK can use it, usage is exact, invalid requests get 400, and the load
generator measures it. Runs the real script on the demo checkpoint in a subprocess."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from support.servers import server_process

from gptoss_ray.checkpoint.write import default_demo_checkpoint
from gptoss_ray.cli import main as cli_main
from gptoss_ray.serve.testing import free_port

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("peer") / "stderr.log"
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peer_server.py"), "--port", str(port),
           "--model", str(default_demo_checkpoint()), "--served-model-name", "peer", "--max-batch-size", "4"]
    with server_process(cmd, port, log, env, ready_timeout_s=120) as base:
        yield base


def test_openai_sdk_streams_and_counts_exactly(peer):
    client = openai.OpenAI(base_url=f"{peer}/v1", api_key="unused", max_retries=0)
    # greedy: a sampled reply of 6 random tokens can open a harmony header and have no content
    extra = {"min_tokens": 6, "ignore_eos": True}
    reply = client.chat.completions.create(model="peer", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=6, temperature=0, extra_body=extra)
    assert reply.usage.completion_tokens == 6 and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens > 1

    stream = client.chat.completions.create(model="peer", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=6, temperature=0, extra_body=extra, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text  # random weights write no harmony header: the parser returns it as content

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="peer", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="peer", messages=[{"role": "user", "content": "x"}], max_tokens=0)


def test_raw_completions_stream_every_token(peer):
    client = openai.OpenAI(base_url=f"{peer}/v1", api_key="unused", max_retries=0)
    chunks = list(client.completions.create(model="peer", prompt="the sea is", max_tokens=5, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 5, "ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 3
    assert sum(1 for c in chunks if c.choices and c.choices[0].text) >= 3  # streamed, not one lump
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_load_generator_against_the_peer(peer, tmp_path):
    out = tmp_path / "peer.json"
    argv = ["bench", "--base-url", peer, "--concurrency", "3", "--num-requests", "6", "--input-len", "8",
            "--output-len", "4", "--warmup", "1", "--no-progress", "--output", str(out)]
    assert cli_main(argv) == 0
    report = json.loads(out.read_text())
    assert report["model"] == "peer" and report["completed"] == 6 and report["errors"] == 0
    assert report["total_output_tokens"] == 24 and report["usage_reported"] is True
    assert report["ttft_p50_ms"] > 0 and report["output_throughput_tok_s"] > 0
