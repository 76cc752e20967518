"""vLLM's conventions on the app, in-process over ASGI: several served names,
GET /v1/models/{id}, /tokenize, /detokenize, /version, CORS, and which routes the
API key guards; and the `serve` flags that map onto them."""

from __future__ import annotations

import argparse
import asyncio

import httpx
import pytest

from gptoss_ray.errors import ConfigError
from gptoss_ray.harmony.encoding import decode, get_encoding
from gptoss_ray.metrics import ServingMetrics
from gptoss_ray.serve.config import ServeConfig
from gptoss_ray.serve.engine_client import LocalClient, ServingContext
from gptoss_ray.serve.ingress import build_api
from gptoss_ray.serve.llm_server import LLMServer

KEY = "route-key"
NAMES = ["primary", "alias"]
ORIGIN = "http://ui.example"


def make_app(**serve_args):
    config = ServeConfig(engine_cls="gptoss_ray.serve.testing:ScriptedEngine", served_model_name=NAMES,
                         engine={"max_model_len": 1024}, api_key=KEY, **serve_args)
    server = LLMServer(config.engine.model_dump(), config.engine_cls)
    return build_api(ServingContext(config, LocalClient(server), ServingMetrics(config.model_name))), server


def call(app, *requests: tuple, key: str | None = KEY) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers=headers) as client:
            return [await client.request(method, path, **kw) for method, path, *rest in requests
                    for kw in [rest[0] if rest else {}]]

    return asyncio.run(run())


@pytest.fixture(scope="module")
def app():
    return make_app()


def test_every_served_name_is_listed_retrievable_and_accepted(app):
    api, server = app
    listed, one, unknown = call(api, ("GET", "/v1/models"), ("GET", "/v1/models/alias"), ("GET", "/v1/models/nope"))
    assert [c["id"] for c in listed.json()["data"]] == NAMES
    assert one.status_code == 200 and one.json()["id"] == "alias" and one.json()["max_model_len"] == 1024
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found" and unknown.json()["error"]["param"] == "model_id"
    for name in NAMES:
        (r,) = call(api, ("POST", "/v1/completions", {"json": {"model": name, "prompt": "hi", "max_tokens": 2}}))
        assert r.status_code == 200, r.text
    (r,) = call(api, ("POST", "/v1/completions", {"json": {"model": "other", "prompt": "hi", "max_tokens": 2}}))
    assert r.status_code == 404 and "'primary', 'alias'" in r.json()["error"]["message"]


def test_tokenize_text_and_chat_match_what_generation_sends(app):
    api, server = app
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text, chat, bare, chat_call = call(
        api, ("POST", "/tokenize", {"json": {"prompt": "Once upon a time", "return_token_strs": True}}),
        ("POST", "/tokenize", {"json": {"model": "alias", "messages": messages}}),
        ("POST", "/tokenize", {"json": {"messages": messages, "add_generation_prompt": False}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "primary", "messages": messages, "max_tokens": 2}}))
    assert chat_call.status_code == 200
    sent = server.engine.debug_prompts()[-1]["prompt_token_ids"]
    ids = get_encoding().encode("Once upon a time")
    assert text.json() == {"count": len(ids), "max_model_len": 1024, "tokens": ids,
                           "token_strs": [decode([t]) for t in ids]}
    assert chat.json()["tokens"] == sent and chat.json()["count"] == len(sent)
    assert decode(chat.json()["tokens"]).endswith("<|start|>assistant")
    assert bare.json()["tokens"] == sent[: len(bare.json()["tokens"])]
    assert decode(bare.json()["tokens"]).endswith("<|end|>")


def test_detokenize_and_version(app):
    api, _ = app
    ids = get_encoding().encode("héllo <|start|>", allowed_special="all")
    ok, bad, wrong_model, version = call(
        api, ("POST", "/detokenize", {"json": {"tokens": ids}}),
        ("POST", "/detokenize", {"json": {"tokens": [1, 201088]}}),
        ("POST", "/detokenize", {"json": {"model": "nope", "tokens": [1]}}), ("GET", "/version"))
    assert ok.json() == {"prompt": "héllo <|start|>"}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert wrong_model.status_code == 404
    assert version.status_code == 200 and version.json()["version"]


@pytest.mark.parametrize("method,path,body", [
    ("GET", "/v1/models/primary", None), ("POST", "/tokenize", {"prompt": "x"}),
    ("POST", "/detokenize", {"tokens": [1]}), ("GET", "/version", None)])
def test_new_routes_need_the_key_and_health_does_not(app, method, path, body):
    api, _ = app
    kw = {"json": body} if body is not None else {}
    no_key, health = call(api, (method, path, kw), ("GET", "/health"), key=None)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert health.status_code == 200


def test_cors_only_for_the_allowed_origins():
    api, _ = make_app(allowed_origins=[ORIGIN])
    preflight = {"headers": {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                             "Access-Control-Request-Headers": "authorization,content-type"}}
    pre, real, stranger, unauthorized = call(
        api, ("OPTIONS", "/v1/completions", preflight), ("GET", "/v1/models", {"headers": {"Origin": ORIGIN}}),
        ("GET", "/v1/models", {"headers": {"Origin": "http://evil.example"}}))[:3] + call(
        api, ("GET", "/v1/models", {"headers": {"Origin": ORIGIN}}), key=None)
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN  # no key needed
    assert real.status_code == 200 and real.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in stranger.headers
    # a browser can read why it was refused
    assert unauthorized.status_code == 401 and unauthorized.headers["access-control-allow-origin"] == ORIGIN


def test_no_cors_by_default(app):
    api, _ = app
    pre, real = call(api, ("OPTIONS", "/v1/models", {"headers": {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}}),
                     ("GET", "/v1/models", {"headers": {"Origin": ORIGIN}}))
    assert pre.status_code != 200 and "access-control-allow-origin" not in real.headers


# --- the flags ---------------------------------------------------------------------


def parse(flags: list[str]):
    from gptoss_ray.serve.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(flags))


def test_serve_flags_as_vllm_spells_them():
    config = parse(["/ckpt/gpt-oss-20b", "--served-model-name", "a", "b", "--allowed-origins", ORIGIN, "*",
                    "--log-level", "info", "--disable-log-requests", "--gpu-memory-utilization", "0.8"])
    assert config.engine.model == "/ckpt/gpt-oss-20b" and config.model_names == ["a", "b"]
    assert config.allowed_origins == [ORIGIN, "*"] and config.log_level == "INFO" and config.disable_log_requests
    assert config.engine.gpu_memory_utilization == 0.8 and config.engine.kv_cache_memory_gb is None
    assert parse(["--model", "openai/gpt-oss-20b"]).model_names == ["openai/gpt-oss-20b"]
    assert parse([]).log_level is None and not parse([]).disable_log_requests and parse([]).allowed_origins == []


@pytest.mark.parametrize("flags,message", [
    (["m1", "--model", "m2"], "disagree"),
    (["--gpu-memory-utilization", "0.5", "--kv-cache-memory-gb", "2"], "not both"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization"),
])
def test_conflicting_or_bad_flags_are_one_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(flags)
