"""OpenAI-compatible Ray Serve app. `gptoss_ray.serve:build_app` is the Serve YAML import path.

Imported lazily so that `import gptoss_ray.serve.protocol` does not start importing Ray."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from gptoss_ray.serve.app import build_app

        return build_app
    raise AttributeError(name)


__all__ = ["build_app"]
