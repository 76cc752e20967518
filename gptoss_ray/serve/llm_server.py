"""LLMServer: the Serve deployment that owns one model instance's engine.

One replica = one model instance (its engine drives `ep_size` expert-parallel workers).
The engine class is injected by import path (`module:Class`), imported only here, in
the replica, so the ingress never imports torch and tests can run a real Serve app over
a scripted engine (gptoss_ray/serve/testing.py).

The engine is anything with the `Engine` protocol of gptoss_ray/engine_api.py
(gptoss_ray.engine.async_engine.AsyncLLMEngine implements it), built from the
EngineConfig by an `EngineFactory`; stats and info cross the Ray handle as the typed
`EngineStats` and `EngineInfo`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine_api import Engine, EngineFactory, EngineInfo, EngineStats
from gptoss_ray.errors import ConfigError
from gptoss_ray.sampling_params import SamplingParams, TokenDelta
from gptoss_ray.serve.config import install_log_level

logger = logging.getLogger(__name__)


def load_engine_factory(spec: str | EngineFactory) -> EngineFactory:
    """`module:attr` (a class or factory taking EngineConfig) or the callable itself."""
    if callable(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"engine_cls {spec!r}: expected 'module:Class'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"engine_cls {spec!r}: cannot import ({e})") from None


class LLMServer:
    """Owns the engine; every method here is called through a Serve handle (or directly in tests)."""

    def __init__(self, engine_config: dict | EngineConfig,
                 engine_cls: str | EngineFactory = "gptoss_ray.engine.async_engine:AsyncLLMEngine",
                 log_level: str | None = None):
        install_log_level(log_level)
        config = engine_config if isinstance(engine_config, EngineConfig) else EngineConfig.model_validate(engine_config)
        self.engine: Engine = load_engine_factory(engine_cls)(config)
        logger.info("LLMServer ready: engine %s, max_model_len %d", engine_cls, self.engine.max_model_len)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Stream the request's deltas; a caller that goes away (cancellation) aborts it."""
        done = False
        try:
            async for delta in self.engine.generate(request_id, prompt_token_ids, params):
                yield delta
            done = True
        finally:
            if not done:  # cancelled or failed mid-way: the KV blocks must not wait for GC
                await self.engine.abort(request_id)

    async def abort(self, request_id: str, index: int | None = None) -> None:
        await self.engine.abort(request_id, index)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def info(self) -> EngineInfo:
        return EngineInfo(max_model_len=int(self.engine.max_model_len))

    async def check_health(self) -> None:
        """Also Serve's replica health check: a dead engine gets the replica restarted."""
        await self.engine.check_health()

    async def debug(self, name: str) -> Any:
        """Test introspection: the result of the engine's `debug_<name>()` (scripted engines only)."""
        method = getattr(self.engine, f"debug_{name}", None)
        if method is None:
            raise AttributeError(f"engine has no debug_{name}")
        return method()

    async def shutdown(self) -> None:
        await self.engine.shutdown()


class LLMServerReplica(LLMServer):
    """The deployed form: Serve awaits an async `__del__` when the replica stops, which
    shuts the engine's workers down (kept off LLMServer, which tests use in-process)."""

    async def __del__(self) -> None:
        engine = getattr(self, "engine", None)  # absent when the engine failed to load
        if engine is None:
            return
        try:
            await engine.shutdown()
        except Exception:  # the replica is going away either way
            logger.exception("engine shutdown failed")
