"""deploy/: the Serve config, the RayService manifest and the Dockerfile.

The RayService is checked against KubeRay's CRD schema kept in deploy/schemas/, the
built-in kinds with kubernetes-validate, the Serve config with Ray's own schema; then the
properties the deployment depends on (token auth, API key from a Secret, /health
readiness, GPUs = ep_size, bounded queue, autoscaling) are asserted one by one."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from gptoss_ray.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

_spec = importlib.util.spec_from_file_location("deploy_validate", DEPLOY / "validate.py")
validate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(validate)

@pytest.fixture(scope="module")
def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = validate.load_documents((DEPLOY / "rayservice.yaml").read_text())
    return {doc["kind"]: doc for doc in docs}


def _deployment(config: dict, name: str) -> dict:
    (app,) = config["applications"]
    return next(d for d in app["deployments"] if d["name"] == name)


def _worker(rayservice: dict) -> dict:
    (group,) = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


def _containers(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


# --- the files validate ------------------------------------------------------------------


def test_rayservice_manifest_validates():
    docs = validate.validate_stream((DEPLOY / "rayservice.yaml").read_text())
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "NetworkPolicy", "RayService"]


def test_serve_config_parses_with_rays_schema(serve_config):
    from ray.serve.schema import ServeDeploySchema

    validate.validate_serve_config(serve_config)
    parsed = ServeDeploySchema.model_validate(serve_config)
    assert parsed.applications[0].import_path == "gptoss_ray.serve:build_app"


def test_rayservice_embeds_the_serve_config(manifests, serve_config):
    assert yaml.safe_load(manifests["RayService"]["spec"]["serveConfigV2"]) == serve_config


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParam"), {}, "rayStartParam"),
        (("spec", "rayClusterConfig", "headGroupSpec", "rayStartParams", "num-cpus"), 0, "num-cpus"),
        (("spec", "rayClusterConfig", "authOptions", "mode"), "tokens", "mode"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplica"), 1, "minReplica"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "imagee"), "x", "imagee"),
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "readinessProbe", "httpGet", "port"), [8000], "port"),
    ],
    ids=["unknown-field", "non-string-start-param", "bad-enum", "worker-typo", "pod-template-typo", "probe-type"],
)
def test_rayservice_schema_rejects_a_broken_manifest(manifests, path, value, message):
    doc = copy.deepcopy(manifests["RayService"])
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(validate.ManifestError, match=message):
        validate.validate_document(doc)


def test_rayservice_schema_rejects_a_missing_head_group(manifests):
    doc = copy.deepcopy(manifests["RayService"])
    del doc["spec"]["rayClusterConfig"]["headGroupSpec"]
    with pytest.raises(validate.ManifestError, match="headGroupSpec"):
        validate.validate_document(doc)


def test_builtin_kinds_are_validated_strictly(manifests):
    doc = copy.deepcopy(manifests["NetworkPolicy"])
    doc["spec"]["ingress"][0]["form"] = doc["spec"]["ingress"][0].pop("from")
    with pytest.raises(validate.ManifestError, match="form"):
        validate.validate_document(doc)


def test_serve_config_validation_rejects_unknown_and_invalid_keys(serve_config):
    typo = copy.deepcopy(serve_config)
    _deployment(typo, "LLMServer")["max_queued_request"] = 10
    with pytest.raises(validate.ManifestError, match="max_queued_request"):
        validate.validate_serve_config(typo)
    inverted = copy.deepcopy(serve_config)
    _deployment(inverted, "LLMServer")["autoscaling_config"].update(min_replicas=3, max_replicas=1)
    with pytest.raises(validate.ManifestError, match="autoscaling_config"):
        validate.validate_serve_config(inverted)


# --- what the deployment relies on -------------------------------------------------------


def test_app_args_are_what_build_app_takes(serve_config, monkeypatch):
    monkeypatch.delenv("GPTOSS_RAY_API_KEY", raising=False)
    args = serve_config["applications"][0]["args"]
    config = ServeConfig.from_args(args)  # extra="forbid": a misspelt argument fails here
    assert (config.engine.model, config.engine.ep_size) == ("openai/gpt-oss-120b", 2)
    assert config.api_key is None  # the key is never in the file: it comes from the Secret
    assert "api_key" not in args and "api_key_file" not in args


def test_llm_server_autoscales_and_the_queue_is_bounded(serve_config):
    app = serve_config["applications"][0]
    config = ServeConfig.from_args(app["args"])
    llm, ingress = _deployment(serve_config, "LLMServer"), _deployment(serve_config, "OpenAIIngress")
    auto = llm["autoscaling_config"]
    for key in ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
        assert key in auto, key
    assert 1 <= auto["min_replicas"] <= auto["max_replicas"]
    assert "num_replicas" not in llm  # a fixed count would switch autoscaling off
    # A replica takes one engine batch; more would queue inside one engine, out of sight
    # of the autoscaler and of replicas that come up later.
    assert auto["target_ongoing_requests"] < llm["max_ongoing_requests"] == config.engine.max_num_seqs
    # Bounded everywhere (-1 = unbounded): the app's 429 first, Serve's queues behind it
    # never smaller than what one ingress replica can have waiting.
    assert 0 < config.max_queued_requests
    assert llm["max_queued_requests"] >= config.max_inflight - llm["max_ongoing_requests"]
    assert ingress["max_queued_requests"] > 0 and ingress["backpressure_config"]["status_code"] == 429


def test_ray_token_auth_is_on(manifests):
    assert manifests["RayService"]["spec"]["rayClusterConfig"]["authOptions"]["mode"] == "token"


def test_api_key_comes_from_a_secret_in_every_ray_container(manifests):
    for container in _containers(manifests["RayService"]):
        env = {e["name"]: e for e in container["env"]}
        ref = env["GPTOSS_RAY_API_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"] == "api-key", container["name"]
        assert "value" not in env["GPTOSS_RAY_API_KEY"]


def test_gpu_workers_hold_one_replica_and_report_ready_from_health(manifests, serve_config):
    rayservice = manifests["RayService"]
    args = serve_config["applications"][0]["args"]
    group = _worker(rayservice)
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == args["ep_size"]
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/health", 8000)
    auto = _deployment(serve_config, "LLMServer")["autoscaling_config"]
    assert (group["minReplicas"], group["maxReplicas"]) == (auto["min_replicas"], auto["max_replicas"])
    assert rayservice["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_model_cache_volume_is_the_hf_home(manifests):
    pod = _worker(manifests["RayService"])["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    hf_home = {e["name"]: e.get("value") for e in container["env"]}["HF_HOME"]
    assert hf_home.startswith(mounts["model-cache"] + "/")


def test_network_policy_exposes_only_the_serve_port(manifests):
    rayservice, policy = manifests["RayService"], manifests["NetworkPolicy"]
    for pod in [rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["template"], _worker(rayservice)["template"]]:
        labels = pod["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = validate.open_ports(policy)
    assert allowed.pop("own pods") is None  # Ray's own traffic: every port
    assert allowed.pop("anyone") == {8000}
    (operator_ports,) = allowed.values()  # the KubeRay operator, and nobody else
    assert operator_ports == {8265}
    assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_ray_version_is_the_same_everywhere(manifests):
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (image_version,) = re.findall(r"ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-", dockerfile)
    chart_values = yaml.safe_load((ROOT / "helm" / "gptoss-ray" / "values.yaml").read_text())
    assert image_version == manifests["RayService"]["spec"]["rayClusterConfig"]["rayVersion"]
    assert image_version == chart_values["rayVersion"]
