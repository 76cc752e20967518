"""Request validation in the app (in-process over ASGI, scripted engine): every number a
client sends is bounded, types are strict, parameters this server does not implement are
400s naming them, and malformed text or nesting is a 400, never a 500. Error bodies never
carry an exception's message or type name from inside the server."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from gptoss_ray.metrics import ServingMetrics
from gptoss_ray.serve.config import ServeConfig
from gptoss_ray.serve.engine_client import LocalClient, ServingContext
from gptoss_ray.serve.ingress import build_api
from gptoss_ray.serve.llm_server import LLMServer

MODEL = "m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
TEXT = {"model": MODEL, "prompt": "hi"}
EXTREMES = [0, -1, 2**63, 10**20, float("nan"), float("inf"), float("-inf")]


def make_app():
    config = ServeConfig(engine_cls="gptoss_ray.serve.testing:ScriptedEngine", served_model_name=MODEL,
                         engine={"max_model_len": 1024})
    server = LLMServer(config.engine.model_dump(), config.engine_cls)
    return build_api(ServingContext(config, LocalClient(server), ServingMetrics(MODEL))), server


APP, SERVER = make_app()


def post(path: str, body: dict | bytes) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as client:
            # NaN / Infinity as Python's json writes them (and parses them): not standard JSON, still sent
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return await client.post(path, content=content, headers={"content-type": "application/json"})

    return asyncio.run(go())


def assert_400(r: httpx.Response, param: str | None) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert "Traceback" not in r.text and "Error(" not in r.text and "'None'" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


NUMERIC_CHAT = ["temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                "repetition_penalty", "min_tokens", "max_tokens", "max_completion_tokens", "top_logprobs",
                "best_of"]
NUMERIC_TEXT = ["temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                "repetition_penalty", "min_tokens", "max_tokens", "logprobs", "best_of"]


@pytest.mark.parametrize("path, base, field", [("/v1/chat/completions", CHAT, f) for f in NUMERIC_CHAT]
                         + [("/v1/completions", TEXT, f) for f in NUMERIC_TEXT])
def test_every_numeric_field_at_its_extremes_is_a_200_or_a_400_naming_it(path, base, field):
    """0, -1, 2^63, 10^20, NaN and +-inf in every numeric field: each is either valid (a 200)
    or a 400 naming the field; none reaches the engine unbounded (no 500, no 503)."""
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    for value in EXTREMES:
        r = post(path, {**base, **extra, field: value})
        assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
        if r.status_code == 400:
            assert_400(r, field)
    huge = post(path, {**base, **extra, field: 10**20})
    assert_400(huge, field)


@pytest.mark.parametrize("body, param", [
    ({**CHAT, "top_k": 10**20, "temperature": 1}, "top_k"),  # once a 500 that killed the engine
    ({**CHAT, "max_tokens": "5"}, "max_tokens"),  # no coercion, as OpenAI
    ({**CHAT, "temperature": "1"}, "temperature"),
    ({**CHAT, "stream": "true"}, "stream"),
    ({**CHAT, "logprobs": 1}, "logprobs"),
    ({**CHAT, "functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({**CHAT, "function_call": "auto"}, "function_call"),
    ({**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({**CHAT, "web_search_options": {}}, "web_search_options"),
    ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({**CHAT, "top_logprobs": 3}, "top_logprobs"),
    ({**CHAT, "best_of": 3}, "best_of"),
    ({**CHAT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"5": 101}}, "logit_bias"),
    ({**CHAT, "logit_bias": {"999999999": 1}}, "logit_bias"),
    ({**CHAT, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({**CHAT, "model": "x" * 300}, "model"),
    ({**CHAT, "user": "u" * 1000}, "user"),
    ({**TEXT, "prompt": [True, False]}, "prompt"),
    ({**TEXT, "max_tokens": 5.0}, "max_tokens"),
    ({**TEXT, "best_of": 2}, "best_of"),
])
def test_bad_parameters_are_400_naming_them(body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    message = assert_400(post(path, body), param)
    assert param in message or param in ("temperature", "max_tokens", "stream", "logprobs", "prompt", "model",
                                         "user")


def test_empty_and_non_object_bodies_say_so():
    assert "empty" in assert_400(post("/v1/chat/completions", b""), None)
    assert "JSON object" in assert_400(post("/v1/chat/completions", b"[1, 2]"), None)


def test_lone_surrogate_is_400():
    body = b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert_400(post("/v1/chat/completions", body), "messages[0].content")
    assert_400(post("/v1/completions", b'{"model": "m", "prompt": "\\udfff"}'), "prompt")


@pytest.mark.parametrize("depth", [100, 900, 5000])
def test_deeply_nested_tool_schemas_are_400(depth):
    # built as text: json.dumps itself recurses
    text = json.dumps({**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": "X"}}]})
    inner = '{"type": "string"}'
    for _ in range(depth // 2):
        inner = '{"type": "object", "properties": {"a": ' + inner + "}}"
    r = post("/v1/chat/completions", text.replace('"X"', inner).encode())
    assert_400(r, None)


def test_logit_bias_reaches_the_engine_as_token_ids():
    r = post("/v1/chat/completions", {**CHAT, "logit_bias": {"17": 5.5, "200": -100}})
    assert r.status_code == 200, r.text
    assert SERVER.engine.debug_prompts()[-1]["params"]["logit_bias"] == {17: 5.5, 200: -100.0}


def test_supported_values_still_pass():
    for body in ({**CHAT, "temperature": 0, "top_p": 1, "n": 2, "seed": 2**63 - 1, "top_k": 0, "max_tokens": 5},
                 {**CHAT, "best_of": 1}, {**CHAT, "logprobs": True, "top_logprobs": 2},
                 {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                 {**TEXT, "prompt": [1, 2, 3], "max_tokens": 3}, {**TEXT, "logit_bias": {"0": -100.0}}):
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        assert post(path, body).status_code == 200, body


def test_admission_counts_sequences_and_gives_them_back():
    """Bound of 4 sequences (max_num_seqs 2 + 2 queued): with 3 held, a 2-sequence request
    (n=2, or two prompts) is a 429 and a 1-sequence one fits; every request gives its
    sequences back, a streaming body that is never iterated included."""
    import gc

    config = ServeConfig(engine_cls="gptoss_ray.serve.testing:ScriptedEngine", served_model_name=MODEL,
                         engine={"max_model_len": 1024, "max_num_seqs": 2}, max_queued_requests=2)
    server = LLMServer(config.engine.model_dump(), config.engine_cls)
    ctx = ServingContext(config, LocalClient(server), ServingMetrics(MODEL))
    app = build_api(ctx)

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            held = ctx.admit(3)  # a request of three sequences, running
            codes = [(await client.post("/v1/completions", json={**TEXT, "n": 2})).status_code,
                     (await client.post("/v1/completions", json={**TEXT, "prompt": ["a", "b"]})).status_code,
                     (await client.post("/v1/chat/completions", json={**CHAT, "n": 2, "stream": True})).status_code,
                     (await client.post("/v1/completions", json=TEXT)).status_code]
            held.release()
            codes.append((await client.post("/v1/completions", json={**TEXT, "n": 2, "stream": True})).status_code)
            return codes

    assert asyncio.run(go()) == [429, 429, 429, 200, 200]
    assert ctx.inflight_seqs == 0

    async def body():
        yield "never iterated"

    ctx.admit(4).guard(body())  # the client left before the response started
    gc.collect()
    assert ctx.inflight_seqs == 0
