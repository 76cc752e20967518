"""The app in-process over ASGI: schemathesis against its OpenAPI schema (no 5xx),
/health on a dead engine, and the serve layer importing no torch."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from gptoss_ray.metrics import ServingMetrics
from gptoss_ray.serve.config import ServeConfig
from gptoss_ray.serve.engine_client import LocalClient, ServingContext
from gptoss_ray.serve.ingress import build_api
from gptoss_ray.serve.llm_server import LLMServer

MODEL = "m"


def make_app(**serve_args):
    config = ServeConfig(engine_cls="gptoss_ray.serve.testing:ScriptedEngine", served_model_name=MODEL,
                         engine={"max_model_len": 1024}, **serve_args)
    server = LLMServer(config.engine.model_dump(), config.engine_cls)
    return build_api(ServingContext(config, LocalClient(server), ServingMetrics(MODEL))), server


APP, _ = make_app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# valid and invalid bodies alike: an invalid one must be a 4xx, never a 5xx
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], database="none")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL  # reach past the model check into rendering and sampling
    case.call_and_validate(checks=[not_a_server_error])


def test_schema_lists_every_route():
    paths = APP.openapi()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"} <= set(paths)


def test_health_is_503_when_the_engine_is_dead():
    app, server = make_app()

    async def check() -> tuple[int, int, dict]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            ok = (await client.get("/health")).status_code
            server.engine.dead = True
            dead = await client.get("/health")
            return ok, dead.status_code, dead.json()

    ok, dead, body = asyncio.run(check())
    assert (ok, dead) == (200, 503) and body["error"]["code"] == "engine_unavailable"


def test_requests_to_a_dead_engine_are_503_not_500():
    app, server = make_app()
    server.engine.dead = True

    async def ask(stream: bool) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream})

    r = asyncio.run(ask(False))
    assert r.status_code == 503 and r.headers["Retry-After"] == "5"
    assert r.json()["error"]["code"] == "engine_unavailable" and "Traceback" not in r.text
    events = [x for x in asyncio.run(ask(True)).text.splitlines() if x.startswith("data: ")]
    assert '"engine_unavailable"' in events[-2] and events[-1] == "data: [DONE]"


def test_serve_layer_imports_no_torch():
    code = ("import sys; import gptoss_ray.serve.app, gptoss_ray.serve.cli, gptoss_ray.serve.testing, "
            "gptoss_ray.harmony.parse, gptoss_ray.metrics; "
            "from gptoss_ray.serve import build_app; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("args, name", [({}, "gpt-oss-tiny-demo"), ({"model": "openai/gpt-oss-120b"}, "openai/gpt-oss-120b"),
                                        ({"model": "x", "served_model_name": "y"}, "y")])
def test_served_model_name_and_yaml_args(args, name):
    config = ServeConfig.from_args({**args, "ep_size": 2, "max_queued_requests": 3})
    assert config.model_name == name and config.engine.ep_size == 2 and config.max_queued_requests == 3


def test_replica_resources_follow_ep_size():
    from gptoss_ray.config import worker_env
    from gptoss_ray.serve.app import server_resources

    one = server_resources(ServeConfig.from_args({"device": "cuda"}))
    assert one == {"ray_actor_options": {"num_cpus": 1.0, "num_gpus": 1}}
    three = server_resources(ServeConfig.from_args({"ep_size": 3, "device": "cuda", "worker_num_cpus": 2,
                                                    "placement_strategy": "STRICT_PACK"}))
    assert three["placement_group_bundles"] == [{"CPU": 1.0}] + [{"CPU": 2.0, "GPU": 1}] * 3
    assert three["placement_group_strategy"] == "STRICT_PACK" and three["ray_actor_options"] == {"num_cpus": 1.0}
    cpu = server_resources(ServeConfig.from_args({"ep_size": 2, "device": "cpu", "worker_num_cpus": 0}))
    assert cpu["placement_group_bundles"][1] == {"CPU": 0.001}  # Ray refuses empty bundles
    # an ep_size 1 replica runs its CPU worker in its own process: started with the worker's env
    cpu_one = server_resources(ServeConfig.from_args({"device": "cpu"}))["ray_actor_options"]
    assert cpu_one["runtime_env"] == {"env_vars": worker_env("cpu")} and cpu_one["num_gpus"] == 0


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_json_body_is_read_whatever_the_declared_content_type(content_type):
    app, _ = make_app()
    headers = {"content-type": content_type} if content_type else {}
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'  # what `curl -d` sends

    async def ask() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post("/v1/chat/completions", content=body, headers=headers)

    r = asyncio.run(ask())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# --- every number at its extremes, every bounded string past its bound -------------------

EXTREMES = [0, -1, 2**63, 10**20, float("nan"), float("inf"), float("-inf")]
BASES = {
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    "/v1/responses": {"model": MODEL, "input": "hi", "max_output_tokens": 16},
    "/tokenize": {"model": MODEL, "prompt": "hi"},
    "/detokenize": {"model": MODEL, "tokens": [1, 2]},
}


def _resolve(spec: dict, schemas: dict) -> dict:
    ref = spec.get("$ref")
    return schemas[ref.rsplit("/", 1)[1]] if ref else spec


def _members(spec: dict, schemas: dict) -> list[dict]:
    spec = _resolve(spec, schemas)
    out = []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in spec.get(key, []):
            out += _members(sub, schemas)
    return out or [spec]


def _fields() -> list[tuple[str, str, str, dict]]:
    """(path, field, kind, schema) of every numeric and every length-bounded string field of
    every POST body in the app's OpenAPI schema: a field added later is covered too."""
    api = APP.openapi()
    schemas = api["components"]["schemas"]
    out = []
    for path, ops in api["paths"].items():
        body = ops.get("post", {}).get("requestBody")
        if not body or "{" in path:
            continue
        model = _resolve(body["content"]["application/json"]["schema"], schemas)
        for name, prop in model.get("properties", {}).items():
            members = _members(prop, schemas)
            if any(m.get("type") in ("integer", "number") for m in members):
                out.append((path, name, "number", prop))
            for m in members:
                if m.get("type") == "string" and "maxLength" in m:
                    out.append((path, name, "string", m))
    return out


FIELDS = _fields()


def test_the_schema_walk_finds_the_fields():
    found = {(p, f) for p, f, _, _ in FIELDS}
    assert {("/v1/chat/completions", "top_k"), ("/v1/completions", "max_tokens"), ("/v1/chat/completions", "seed"),
            ("/v1/chat/completions", "model")} <= found


@pytest.mark.parametrize("path, field, kind, spec", FIELDS, ids=[f"{p}:{f}:{k}" for p, f, k, _ in FIELDS])
def test_extremes_of_every_field_are_never_a_server_error(path, field, kind, spec):
    """0, -1, 2^63, 10^20, NaN and +-inf in every numeric field; every bounded string at its
    bound and one past it: a 2xx or a 4xx naming nothing internal, never a 5xx."""
    import json

    base = BASES.get(path, {"model": MODEL})
    values = EXTREMES if kind == "number" else ["x" * spec["maxLength"], "x" * (spec["maxLength"] + 1)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t") as client:
            return [await client.post(path, content=json.dumps({**base, field: v}).encode(),
                                      headers={"content-type": "application/json"}) for v in values]

    for value, r in zip(values, asyncio.run(run())):
        shown = value if kind == "number" else f"{len(value)} chars"
        assert r.status_code < 500, (path, field, shown, r.status_code, r.text[:300])
        assert "Traceback" not in r.text
    if kind == "string":
        assert r.status_code == 400, (path, field, r.text[:300])  # one past the bound
    else:  # 10^20 is past every number's bound: no field takes it unbounded
        huge = dict(zip([str(v) for v in values], asyncio.run(run())))[str(10**20)]
        assert huge.status_code == 400, (path, field, huge.text[:300])
