"""helm/gptoss-ray: values.schema.json accepts values.yaml and every preset merged over
it (as `helm install -f preset` merges them), and rejects bad values. Runs without Helm."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gptoss_ray.serve.config import ServeConfig

CHART = Path(__file__).resolve().parents[2] / "helm" / "gptoss-ray"
PRESETS = sorted((CHART / "presets").glob("*.yaml"))
EXPECTED_PRESETS = {"2xa100-80gb", "2xh100", "3x24gb", "4xa100", "4xh100"}
# GiB of GPU memory each kind of GPU in a preset's name offers (nvidia-smi total).
GPU_GIB = {"a100": 79.2, "h100": 79.2, "24gb": 23.6}


def helm_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over the chart's values: maps merge key by
    key, anything else replaces, and null deletes the key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def defaults() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def _errors(validator: jsonschema.Validator, values: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(values)]


def test_every_preset_is_there():
    assert {p.stem for p in PRESETS} == EXPECTED_PRESETS


def test_defaults_validate(validator, defaults):
    assert _errors(validator, defaults) == []


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_over_the_defaults(validator, defaults, preset):
    values = helm_merge(defaults, yaml.safe_load(preset.read_text()))
    assert _errors(validator, values) == []


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_is_consistent(defaults, preset):
    """GPU count = a whole number of model instances, KV budget + weights fit the GPU,
    the app arguments are a valid ServeConfig."""
    values = helm_merge(defaults, yaml.safe_load(preset.read_text()))
    engine, worker = values["engine"], values["worker"]
    count, kind = preset.stem.split("x", 1)
    assert worker["gpus"] == int(count) and worker["gpus"] % engine["epSize"] == 0
    ServeConfig.from_args({
        "model": values["model"]["name"], "ep_size": engine["epSize"], "kv_cache_memory_gb": engine["kvCacheMemoryGb"],
        "max_num_seqs": engine["maxNumSeqs"], "max_num_batched_tokens": engine["maxNumBatchedTokens"],
        "max_queued_requests": values["serve"]["maxQueuedRequests"],
    })
    # Weights per GPU (MXFP4 experts split over ep_size GPUs + bf16 replicated parts).
    experts_gib, replicated_gib = {"openai/gpt-oss-120b": (56.8, 4.0), "openai/gpt-oss-20b": (9.5, 3.4)}[values["model"]["name"]]
    weights_gib = experts_gib / engine["epSize"] + replicated_gib
    gpu_gib = next(v for k, v in GPU_GIB.items() if kind.startswith(k))
    headroom_gib = gpu_gib - weights_gib - engine["kvCacheMemoryGb"]
    assert 2.0 <= headroom_gib <= 12.0, f"{headroom_gib:.1f} GiB left for context and activations"


@pytest.mark.parametrize(
    "override, where",
    [
        ({"engine": {"epSize": 0}}, "engine/epSize"),
        ({"engine": {"epSize": "2"}}, "engine/epSize"),
        ({"worker": {"gpus": None}}, "worker: 'gpus' is a required property"),
        ({"worker": {"gpus": 0}}, "worker/gpus"),
        ({"engine": {"kvCacheMemoryGb": 0}}, "engine/kvCacheMemoryGb"),
        ({"serve": {"maxQueuedRequests": -1}}, "serve/maxQueuedRequests"),
        ({"engine": {"dtype": "fp8"}}, "engine/dtype"),
        ({"engine": {"ep_size": 2}}, "engine: Additional properties"),
        ({"model": {"name": ""}}, "model/name"),
        ({"rayVersion": "latest"}, "rayVersion"),
        ({"responses": {"store": "mysql://db"}}, "responses/store"),
        ({"responses": {"ttlSeconds": 0}}, "responses/ttlSeconds"),
        ({"responses": {"postgres": {"secret": "pg"}}}, "responses/postgres: Additional properties"),
    ],
    ids=["ep0", "ep-string", "no-gpu-count", "gpu0", "kv0", "unbounded-queue", "dtype", "snake-case-typo", "no-model",
         "ray-version", "responses-store-url", "responses-ttl0", "responses-pg-typo"],
)
def test_schema_rejects_bad_values(validator, defaults, override, where):
    errors = _errors(validator, helm_merge(defaults, override))
    assert any(e.startswith(where) for e in errors), errors
