"""A live Serve app over the scripted engine (exact token streams), shared by serve tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from gptoss_ray.serve.testing import local_serve_app


@contextlib.contextmanager
def scripted_app(model: str, app_name: str) -> Iterator[tuple[str, object]]:
    """Yield (base URL, the LLMServer handle) of an app serving `model` by the scripted engine."""
    args = {"engine_cls": "gptoss_ray.serve.testing:ScriptedEngine", "served_model_name": model,
            "engine": {"max_model_len": 2048}}
    with local_serve_app(args, app_name=app_name) as url:
        from ray import serve

        yield url, serve.get_deployment_handle("LLMServer", app_name=app_name)


def sdk_client(url: str):
    """The official openai client on an app's base URL: no retries, so a test sees every error."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
