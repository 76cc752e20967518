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


# near misses too: a check on a prefix, a length or the case alone would let them in
@pytest.mark.parametrize("key", [None, "wrong-key", KEY[:-1], KEY + "x", "sk-test-999", "sk-test-", KEY.upper(),
                                 KEY + " " + KEY, KEY[1:]])
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


def test_a_request_larger_than_the_whole_bound_is_400(url):
    # the bound here is 1 sequence: 2 prompts, or n=2, can never be admitted
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    err = assert_envelope(r, 400)
    assert err["code"] == "request_too_large" and "2 sequences" in err["message"]
    err = assert_envelope(post(url, json={**GOOD, "n": 2, "stream": True}), 400)
    assert err["code"] == "request_too_large"


def test_streams_over_capacity_get_429_before_the_response_starts(url):
    """Concurrent streams against a bound of 1: each is either a 429 with Retry-After or a
    200 whose stream completes; never a 200 followed by an error event (which SDKs do not
    retry). Admission is decided before the response starts."""
    import asyncio

    body = {**GOOD, "messages": [{"role": "user", "content": "[[script:slow]]"}], "max_tokens": 30, "stream": True}

    async def one(client: httpx.AsyncClient) -> tuple[int, str, str | None]:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"Authorization": f"Bearer {KEY}"}) as r:
            return r.status_code, (await r.aread()).decode(), r.headers.get("Retry-After")

    async def burst() -> list[tuple[int, str, str | None]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    results = asyncio.run(burst())
    statuses = sorted(s for s, _, _ in results)
    assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}, statuses
    for status, text, retry in results:
        if status == 429:
            assert retry == "1" and json.loads(text)["error"]["code"] == "queue_full"
        else:
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]"), text[-300:]
    assert post(url, json=GOOD).status_code == 200  # every admission was given back
