"""`build_app(args)`: the Serve application (OpenAIIngress -> LLMServer).

Usable from a Serve config YAML:

    applications:
      - name: gptoss
        route_prefix: /
        import_path: gptoss_ray.serve:build_app
        args: {model: openai/gpt-oss-120b, ep_size: 2, api_key_file: /secrets/key}

`args` are ServeConfig fields; EngineConfig fields may sit at top level or under `engine`.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from gptoss_ray.config import worker_env
from gptoss_ray.serve.config import ServeConfig, serve_logging
from gptoss_ray.serve.ingress import OpenAIIngress
from gptoss_ray.serve.llm_server import LLMServerReplica


def _wants_gpu(device: str) -> bool:
    if device != "auto":
        return device == "cuda"
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def server_resources(config: ServeConfig) -> dict[str, Any]:
    """Deployment options giving one LLMServer replica the resources of its model instance.

    ep_size 1: the engine runs its worker in the replica, so the replica holds the GPU.
    ep_size N > 1: the replica's placement group is [replica] + [worker] * N; the engine's
    worker group finds it and places rank r on bundle r + 1, so Serve reserves (and
    autoscales on) exactly what the instance uses."""
    engine = config.engine
    gpu = {"GPU": 1} if _wants_gpu(engine.device) else {}
    if engine.ep_size == 1:
        options = {"num_cpus": config.server_num_cpus, "num_gpus": gpu.get("GPU", 0)}
        env = worker_env("cuda" if gpu else "cpu")  # the replica's process runs the worker (host_memory.py)
        return {"ray_actor_options": options | ({"runtime_env": {"env_vars": env}} if env else {})}
    # Ray refuses an empty bundle: a sliver of CPU keeps a "0 CPU" bundle schedulable
    replica = {"CPU": max(config.server_num_cpus, 0.001)}
    worker = {"CPU": max(engine.worker_num_cpus, 0.001)} | gpu
    return {
        "ray_actor_options": {"num_cpus": replica["CPU"]},
        "placement_group_bundles": [replica] + [worker] * engine.ep_size,
        "placement_group_strategy": engine.placement_strategy,
    }


def build_app(args: dict[str, Any] | ServeConfig | None = None) -> Application:
    config = args if isinstance(args, ServeConfig) else ServeConfig.from_args(args or {})
    server = serve.deployment(
        LLMServerReplica,
        name="LLMServer",
        num_replicas=config.num_replicas,
        **server_resources(config),
        # the engine batches continuously: let it see every admitted request
        max_ongoing_requests=config.max_inflight + 16,
        health_check_period_s=10,
        health_check_timeout_s=max(30.0, config.engine.step_timeout_s),
        logging_config=serve_logging(config),
    ).bind(config.engine.model_dump(), config.engine_cls, config.log_level)
    ingress = serve.deployment(
        OpenAIIngress,
        name="OpenAIIngress",
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        max_ongoing_requests=config.max_inflight + 64,  # our own 429 answers before Serve's queue does
        logging_config=serve_logging(config),
    ).bind(server, config.model_dump())
    return ingress
