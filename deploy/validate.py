"""Validate Kubernetes manifests offline: built-in kinds with kubernetes-validate, the
RayService against KubeRay's CRD schema kept in deploy/schemas/, and its serveConfigV2
with Ray Serve's own schema.

    python deploy/validate.py deploy/rayservice.yaml
    helm template gptoss helm/gptoss-ray -f helm/gptoss-ray/presets/2xh100.yaml | python deploy/validate.py -

Unknown fields are errors everywhere (as `kubectl apply --validate=strict` makes them),
so a misspelt key fails here instead of being silently dropped by the API server.
"""

from __future__ import annotations

import copy
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
RAYSERVICE_SCHEMA = HERE / "schemas" / "ray.io_rayservices.v1.yaml"
# Kubernetes minor version whose built-in schemas the manifests are checked against.
K8S_VERSION = "1.30"
# Kinds that are CRDs of other projects and have no schema here: checked for shape only.
SHAPE_ONLY_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


class ManifestError(ValueError):
    """One manifest (or one field of it) does not match its schema."""


def load_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a manifest stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _k8s_definitions() -> dict[str, Any]:
    """kubernetes-validate's strict (no unknown fields) definitions for K8S_VERSION."""
    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    versions = sorted(
        (d.name for d in base.iterdir() if d.name.endswith("-local-strict")),
        key=lambda name: tuple(int(x) for x in name[1:].split("-")[0].split(".")),
    )
    wanted = tuple(int(x) for x in K8S_VERSION.split("."))
    usable = [v for v in versions if tuple(int(x) for x in v[1:].split(".")[:2]) <= wanted]
    doc = json.loads((base / usable[-1] / "_definitions.json").read_text())
    doc.pop("$id", None)
    return doc


@functools.cache
def _k8s_type_validator(type_name: str) -> jsonschema.Validator:
    defs = _k8s_definitions()
    if type_name not in defs["$defs"]:
        raise KeyError(f"no Kubernetes definition named {type_name}")
    return jsonschema.Draft202012Validator(defs | {"$ref": f"#/$defs/{type_name}"})


def _close_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """Forbid unknown fields in every object that lists its properties (the API server's
    strict field validation), except where the CRD says to keep unknown fields."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


@functools.cache
def rayservice_schema() -> dict[str, Any]:
    return _close_objects(yaml.safe_load(RAYSERVICE_SCHEMA.read_text()))


def _typed_subtrees(schema: Any, instance: Any, path: str) -> Iterator[tuple[str, str, Any]]:
    """(path, Kubernetes type name, value) for each part of `instance` that the trimmed CRD
    schema marks with x-gptoss-k8s-type."""
    if not isinstance(schema, dict):
        return
    if "x-gptoss-k8s-type" in schema:
        yield path, schema["x-gptoss-k8s-type"], instance
        return
    if isinstance(instance, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in instance:
                yield from _typed_subtrees(sub, instance[key], f"{path}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            yield from _typed_subtrees(schema["items"], item, f"{path}[{i}]")


def _raise_first(errors: Iterator[jsonschema.ValidationError], where: str) -> None:
    error = next(iter(sorted(errors, key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        field = ".".join(str(p) for p in error.absolute_path) or "(root)"
        raise ManifestError(f"{where}: field '{field}': {error.message}")


def validate_rayservice(doc: dict[str, Any]) -> None:
    """The RayService against the vendored CRD, its core-type parts against Kubernetes'
    schemas, and serveConfigV2 against Ray Serve's schema."""
    name = doc.get("metadata", {}).get("name", "?")
    schema = rayservice_schema()
    _raise_first(jsonschema.Draft7Validator(schema).iter_errors(doc), f"RayService {name}")
    for path, type_name, value in _typed_subtrees(schema, doc, ""):
        _raise_first(_k8s_type_validator(type_name).iter_errors(value), f"RayService {name}{path}")
    if "serveConfigV2" in doc["spec"]:
        validate_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]), f"RayService {name} serveConfigV2")


def validate_serve_config(config: dict[str, Any], where: str = "serve config") -> None:
    """Ray Serve's own ServeDeploySchema, plus: no key that Ray's schema does not know
    (its models accept and drop unknown keys), and autoscaling configs that Ray accepts."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    def known(keys: dict[str, Any], model: type, at: str) -> None:
        unknown = sorted(set(keys) - set(model.model_fields))
        if unknown:
            raise ManifestError(f"{where}: {at}: unknown keys {unknown}")

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:  # pydantic.ValidationError, with Ray's own wording
        raise ManifestError(f"{where}: {e}") from None
    known(config, ServeDeploySchema, "top level")
    for app in config.get("applications", []):
        known(app, ServeApplicationSchema, f"application {app.get('name')}")
        for dep in app.get("deployments", []):
            at = f"deployment {dep.get('name')}"
            known(dep, DeploymentSchema, at)
            if "autoscaling_config" in dep:
                known(dep["autoscaling_config"], AutoscalingConfig, f"{at}.autoscaling_config")
                try:
                    AutoscalingConfig.model_validate(dep["autoscaling_config"])
                except Exception as e:
                    raise ManifestError(f"{where}: {at}.autoscaling_config: {e}") from None


def open_ports(policy: dict[str, Any]) -> dict[str, set[int] | None]:
    """What a NetworkPolicy's ingress rules let in, by who: {"own pods": ports,
    "anyone": ports, "<peer as YAML>": ports}; None means every port. A rule without
    `from` admits anyone; a peer that is exactly the policy's own podSelector is
    "own pods"."""
    own = policy["spec"]["podSelector"]
    allowed: dict[str, set[int] | None] = {}
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule["ports"]} if rule.get("ports") else None
        peers = rule.get("from") or [None]
        for peer in peers:
            if peer is None:
                who = "anyone"
            elif set(peer) == {"podSelector"} and peer["podSelector"] == own:
                who = "own pods"
            else:
                who = yaml.safe_dump(peer, sort_keys=True).strip()
            if ports is None or allowed.get(who, set()) is None:
                allowed[who] = None
            else:
                allowed[who] = allowed.get(who, set()) | ports
    return allowed


def validate_document(doc: dict[str, Any]) -> None:
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if (api_version, kind) == ("ray.io/v1", "RayService"):
        validate_rayservice(doc)
    elif (api_version, kind) in SHAPE_ONLY_KINDS:
        if not isinstance(doc.get("spec"), dict) or not doc.get("metadata", {}).get("name"):
            raise ManifestError(f"{kind}: needs metadata.name and a spec")
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise ManifestError(f"{kind} {doc.get('metadata', {}).get('name')}: {e.message}") from None


def validate_stream(text: str) -> list[dict[str, Any]]:
    """Validate every document of a manifest stream; return them."""
    docs = load_documents(text)
    for doc in docs:
        validate_document(doc)
    return docs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: validate.py FILE|-", file=sys.stderr)
        return 2
    text = sys.stdin.read() if argv[1] == "-" else Path(argv[1]).read_text()
    try:
        docs = validate_stream(text)
    except ManifestError as e:
        print(f"invalid: {e}", file=sys.stderr)
        return 1
    for doc in docs:
        print(f"ok: {doc['kind']} {doc['metadata']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
