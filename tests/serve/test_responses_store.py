"""The response store: both SQL backends against real databases (a SQLite file, a real
PostgreSQL server started here), a continuation after the server restarts (SQLite), and
two Serve applications sharing one PostgreSQL (what two replicas or pods do)."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from gptoss_ray.serve.responses_store import StoredResponse, key_hash, open_store
from gptoss_ray.serve.testing import free_port, local_serve_app
from support.postgres import postgres_or_skip

pytestmark = pytest.mark.timeout(400)
MODEL = "gpt-oss-scripted"
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
SCRIPTED = "gptoss_ray.serve.testing:ScriptedEngine"


@pytest.fixture(scope="module")
def pg_url():
    with postgres_or_skip() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'responses.sqlite3'}"
    return request.getfixturevalue("pg_url")


def record(rid: str, key: str = "a", ttl: float = 60.0, **extra) -> StoredResponse:
    now = time.time()
    return StoredResponse(id=rid, key_hash=key_hash(key), created_at=now, expires_at=now + ttl,
                          response={"id": rid, "status": "completed", "output": []}, **extra)


def test_store_roundtrip_scoping_and_expiry(store_url):
    async def run():
        store = open_store(store_url)
        await store.purge_expired()
        base = await store.count()
        rid = f"resp_{time.time_ns()}"
        await store.put(record(rid, prompt_token_ids=[1, 2, 3], input_items=[{"type": "message"}]))
        got = await store.get(rid, key_hash("a"))
        assert got.prompt_token_ids == [1, 2, 3] and got.input_items == [{"type": "message"}]
        assert await store.get(rid, key_hash("b")) is None  # another key sees nothing
        assert not await store.delete(rid, key_hash("b"))
        updated = record(rid)
        updated.response["status"] = "cancelled"
        await store.put(updated)  # the same id replaces
        assert (await store.get(rid, key_hash("a"))).response["status"] == "cancelled"
        assert await store.count() == base + 1
        await store.put(record(rid + "_old", ttl=-1.0))  # already expired: never returned, then purged
        assert await store.get(rid + "_old", key_hash("a")) is None
        assert await store.purge_expired() == 1 and await store.count() == base + 1
        assert await store.delete(rid, key_hash("a")) and await store.get(rid, key_hash("a")) is None

    asyncio.run(run())


def test_bad_store_url_is_a_config_error():
    from gptoss_ray.errors import ConfigError
    from gptoss_ray.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="responses_store"):
        ServeConfig.from_args({"responses_store": "mysql://x"})


def _in_process(**serve_args):
    import httpx

    from gptoss_ray.metrics import ServingMetrics
    from gptoss_ray.serve.config import ServeConfig
    from gptoss_ray.serve.engine_client import LocalClient, ServingContext
    from gptoss_ray.serve.ingress import build_api
    from gptoss_ray.serve.llm_server import LLMServer

    config = ServeConfig(engine_cls=SCRIPTED, served_model_name=MODEL, **serve_args)
    server = LLMServer(config.engine.model_dump(), config.engine_cls)
    app = build_api(ServingContext(config, LocalClient(server), ServingMetrics(MODEL)))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_store_none_stores_nothing():
    async def run():
        async with _in_process(responses_store="none") as c:
            plain = await c.post("/v1/responses", json={"model": MODEL, "input": "hi"})
            explicit = await c.post("/v1/responses", json={"model": MODEL, "input": "hi", "store": True})
            chained = await c.post("/v1/responses", json={"model": MODEL, "input": "hi",
                                                          "previous_response_id": plain.json()["id"]})
            fetched = await c.get(f"/v1/responses/{plain.json()['id']}")
            return plain, explicit, chained, fetched

    plain, explicit, chained, fetched = asyncio.run(run())
    assert plain.status_code == 200 and plain.json()["store"] is False
    assert explicit.status_code == 400 and explicit.json()["error"]["param"] == "store"
    assert chained.status_code == 404 and chained.json()["error"]["param"] == "previous_response_id"
    assert fetched.status_code == 404


def test_unreachable_database_is_a_503():
    """A store that cannot be reached: 503 with Retry-After, counted in /metrics; never a 500."""
    import httpx

    from gptoss_ray.metrics import ServingMetrics
    from gptoss_ray.serve.config import ServeConfig
    from gptoss_ray.serve.engine_client import LocalClient, ServingContext
    from gptoss_ray.serve.ingress import build_api
    from gptoss_ray.serve.llm_server import LLMServer

    config = ServeConfig(engine_cls=SCRIPTED, served_model_name=MODEL,
                         responses_store=f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    server = LLMServer(config.engine.model_dump(), config.engine_cls)
    app = build_api(ServingContext(config, LocalClient(server), ServingMetrics(MODEL)))

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            created = await c.post("/v1/responses", json={"model": MODEL, "input": "hi"})
            fetched = await c.get("/v1/responses/resp_x")
            metrics = (await c.get("/metrics")).text
            return created, fetched, metrics

    created, fetched, metrics = asyncio.run(run())
    for r in (created, fetched):
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable" and r.headers["retry-after"]
    errors = [line for line in metrics.splitlines() if line.startswith("gptoss:responses_store_errors_total{")]
    assert float(errors[0].split()[-1]) >= 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One Ray cluster and Serve instance for the module's apps; yields (base URL, SQLite
    app args). The SQLite app is "gptoss" at /; tests deploy more apps beside it."""
    store = tmp_path_factory.mktemp("restart") / "responses.sqlite3"
    args = {"engine_cls": SCRIPTED, "served_model_name": MODEL, "responses_store": f"sqlite:///{store}"}
    with local_serve_app(args, app_name="gptoss") as url:
        yield url, args


def test_continuation_after_restart_sqlite(cluster):
    """The app is deleted and deployed again: new ingress and LLMServer actors (new
    processes, nothing in memory survives); only the SQLite file carries the conversation."""
    url, args = cluster
    from ray import serve

    from gptoss_ray.serve.app import build_app

    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
    first = client.responses.create(model=MODEL, input="Weather? [[script:tool_call]]", tools=[WEATHER])
    call = first.output[-1]
    assert call.type == "function_call"
    serve.delete("gptoss")
    serve.run(build_app(args), name="gptoss", route_prefix="/")
    handle = serve.get_deployment_handle("LLMServer", app_name="gptoss")
    assert handle.debug.remote("prompts").result() == []  # a fresh replica: nothing survived in memory
    assert client.responses.retrieve(first.id).output[-1].call_id == call.call_id
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], input=[
        {"type": "function_call_output", "call_id": call.call_id, "output": "21C [[script:after_tool]]"}])
    assert second.output_text == "It is 21C in Paris."
    # the whole first turn was rendered back, token for token, ahead of the tool's output
    (prompt,) = [p["prompt_token_ids"] for p in handle.debug.remote("prompts").result()]
    assert len(prompt) > first.usage.input_tokens + first.usage.output_tokens


def test_two_apps_share_one_postgres(cluster, pg_url):
    """Two applications (each its own ingress and LLMServer actors, as two replicas or pods
    would be) over one PostgreSQL: a conversation started on one continues on the other."""
    from ray import serve

    from gptoss_ray.serve.app import build_app

    url = cluster[0]
    args = {"engine_cls": SCRIPTED, "served_model_name": MODEL, "responses_store": pg_url}
    serve.run(build_app(args), name="a", route_prefix="/a")
    serve.run(build_app(args), name="b", route_prefix="/b")
    try:
        a = openai.OpenAI(base_url=url + "/a/v1", api_key="k", max_retries=0, timeout=60)
        b = openai.OpenAI(base_url=url + "/b/v1", api_key="k", max_retries=0, timeout=60)
        first = a.responses.create(model=MODEL, input="Weather? [[script:tool_call]]", tools=[WEATHER])
        call = first.output[-1]
        second = b.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], input=[
            {"type": "function_call_output", "call_id": call.call_id, "output": "21C [[script:after_tool]]"}])
        assert second.output_text == "It is 21C in Paris."
        assert a.responses.retrieve(second.id).output_text == second.output_text
        prompts_a = serve.get_deployment_handle("LLMServer", app_name="a").debug.remote("prompts").result()
        prompts_b = serve.get_deployment_handle("LLMServer", app_name="b").debug.remote("prompts").result()
        assert len(prompts_a) == 1 and len(prompts_b) == 1  # each app generated one turn
        assert prompts_b[0]["prompt_token_ids"][:len(prompts_a[0]["prompt_token_ids"])] == \
            prompts_a[0]["prompt_token_ids"]
        # a background response running on `a` is cancelled through `b`: `a` stops generating it
        slow = a.responses.create(model=MODEL, input="think [[script:slow]]", background=True)
        assert b.responses.cancel(slow.id).status == "cancelled"
        handle_a = serve.get_deployment_handle("LLMServer", app_name="a")
        for _ in range(1200):  # up to a minute on a loaded machine
            if slow.id in handle_a.debug.remote("aborted").result():
                break
            time.sleep(0.05)
        assert slow.id in handle_a.debug.remote("aborted").result()
        assert a.responses.retrieve(slow.id).status == "cancelled"
        b.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(first.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(second.id, extra_headers={"Authorization": "Bearer other"})
    finally:
        serve.delete("a")
        serve.delete("b")


def test_store_url_from_the_environment(monkeypatch, tmp_path):
    """The helm chart hands a Postgres URL over as $GPTOSS_RAY_RESPONSES_STORE; an explicit URL wins."""
    from gptoss_ray.serve.responses_store import NoStore, PostgresStore, SQLiteStore

    monkeypatch.setenv("GPTOSS_RAY_RESPONSES_STORE", "postgresql://u:p@db:5432/x")
    assert isinstance(open_store(None), PostgresStore)
    assert isinstance(open_store("none"), NoStore)
    monkeypatch.delenv("GPTOSS_RAY_RESPONSES_STORE")
    monkeypatch.setenv("GPTOSS_RAY_CACHE", str(tmp_path))
    default = open_store(None)
    assert isinstance(default, SQLiteStore) and default.path == tmp_path / "responses.sqlite3"


def test_cli_flags():
    import argparse

    from gptoss_ray.serve.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--responses-store", "none", "--responses-ttl", "12h"]))
    assert (config.responses_store, config.responses_ttl_s) == ("none", 12 * 3600)
    assert config_from_args(parser.parse_args(["--responses-ttl", "90"])).responses_ttl_s == 90
    assert config_from_args(parser.parse_args([])).responses_ttl_s == 30 * 24 * 3600
    for bad in ("soon", "0", "-1d"):
        with pytest.raises(SystemExit):  # argparse's one-line usage error
            parser.parse_args(["--responses-ttl", bad])
