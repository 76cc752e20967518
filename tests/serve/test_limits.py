"""API key, body size and the bounded queue, on a live local Serve app (scripted engine)."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from gptoss_ray.serve.config import API_KEY_ENV, ServeConfig
from gptoss_ray.serve.testing import local_serve_app

pytestmark = pytest.mark.timeout(300)
MODEL = "m"
KEY = "sk-test-123"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def url():
    args = {"engine_cls": "gptoss_ray.serve.testing:ScriptedEngine", "served_model_name": MODEL, "api_key": KEY,
            "max_body_bytes": 4096, "max_queued_requests": 0, "engine": {"max_num_seqs": 1}}
    with local_serve_app(args, app_name="limits") as base:
        yield base


def post(url: str, key: str | None = KEY, headers: dict | None = None, **kw) -> httpx.Response:
    headers = {**(headers or {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(url + "/v1/chat/completions", headers=headers, timeout=30, **kw)


def assert_envelope(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    return err


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(url, key):
    r = post(url, key, json=GOOD)
    assert_envelope(r, 401)
    assert r.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/v1/models", "/metrics"):
        assert httpx.get(url + path, timeout=30).status_code == 401
    assert post(url, json=GOOD).status_code == 200


def test_key_accepted_by_the_sdk_and_health_needs_none(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model=MODEL, messages=GOOD["messages"]).choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(url + "/health", timeout=30).status_code == 200


def test_oversized_body_is_413(url):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_envelope(post(url, json=big), 413)
    # chunked upload without Content-Length is bounded too
    chunks = iter([json.dumps(big).encode()[i:i + 1000] for i in range(0, 5200, 1000)])
    assert_envelope(post(url, content=chunks, headers={"content-type": "application/json"}), 413)
    assert post(url, json=GOOD).status_code == 200


def test_full_queue_is_429_with_retry_after(url):
    slow = {**GOOD, "messages": [{"role": "user", "content": "[[script:slow]]"}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=slow, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as first:
        assert first.status_code == 200, first.read()
        lines = first.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)  # admitted and streaming: the only slot is taken
        r = post(url, json=GOOD)
        err = assert_envelope(r, 429)
        assert r.headers["Retry-After"] == "1" and err["code"] == "queue_full"
    # the first client left: its slot frees once the server sees the disconnect
    end = time.monotonic() + 60
    while post(url, json=GOOD).status_code == 429 and time.monotonic() < end:
        time.sleep(0.2)
    assert post(url, json=GOOD).status_code == 200


def test_key_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert ServeConfig().api_key == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert ServeConfig(api_key_file=str(key_file)).api_key == "from-file"
    assert ServeConfig(api_key="flag", api_key_file=str(key_file)).api_key == "flag"
    monkeypatch.delenv(API_KEY_ENV)
    assert ServeConfig().api_key is None
