"""deploy/serve_config.yaml runs: the application it names starts on CPU and answers a
chat request through the openai client.

The config is deployed the way `serve run deploy/serve_config.yaml` (and KubeRay, through
the dashboard) deploys it: the whole ServeDeploySchema, deployment options included (the
autoscaling configs, the bounded queue). The test changes only what a CPU box needs: the
built-in demo checkpoint instead of gpt-oss-120b, float32 on CPU, fractional logical
CPUs, a small KV budget, and 127.0.0.1 on a free port.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gptoss_ray.serve.testing import free_port

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
API_KEY = "test-deploy-key"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def cpu_config(port: int) -> dict:
    """deploy/serve_config.yaml with the CPU overrides above, and nothing else changed."""
    config = copy.deepcopy(yaml.safe_load(CONFIG.read_text()))
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    app["args"].update(
        model=None, dtype="float32", device="cpu", kv_cache_memory_gb=0.01,
        max_num_batched_tokens=256, worker_num_cpus=0.1, ep_size=2,
    )
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.1}
    return config


def _wait_running(app_name: str, deadline_s: float) -> None:
    from ray import serve

    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        status = serve.status().applications.get(app_name)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            pytest.fail(f"deploy failed: {status.message}")
        time.sleep(0.5)
    pytest.fail(f"application not running after {deadline_s}s: {serve.status().applications}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api  # what `serve run CONFIG.yaml` calls
    from ray.serve.schema import ServeDeploySchema

    port = free_port()
    config = ServeDeploySchema.model_validate(cpu_config(port))
    mp = pytest.MonkeyPatch()
    mp.setenv("GPTOSS_RAY_API_KEY", API_KEY)  # as the Kubernetes Secret sets it on the pods
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        client = serve_api.serve_start(http_options=config.http_options.model_dump(),
                                       proxy_location=config.proxy_location)
        client.deploy_apps(config)
        _wait_running(config.applications[0].name, deadline_s=150)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


def test_config_app_answers_a_chat_request(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    (model,) = [m.id for m in client.models.list().data]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0,
    )
    (choice,) = reply.choices
    assert choice.finish_reason in ("stop", "length")
    assert 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.prompt_tokens > 0


def test_deployment_options_come_from_the_config(served):
    """The YAML's deployment options win over build_app's code defaults."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployed = details["applications"]["gptoss"]["deployments"]
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    for expected in app["deployments"]:
        config = deployed[expected["name"]]["deployment_config"]
        assert config["max_ongoing_requests"] == expected["max_ongoing_requests"]
        assert config["max_queued_requests"] == expected["max_queued_requests"]
        for key, value in expected["autoscaling_config"].items():
            assert config["autoscaling_config"][key] == value, (expected["name"], key)


def test_health_is_open_and_the_api_needs_the_key(served):
    assert httpx.get(f"{served}/health", timeout=30).status_code == 200
    assert httpx.get(f"{served}/v1/models", timeout=30).status_code == 401
