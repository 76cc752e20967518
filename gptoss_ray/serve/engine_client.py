"""How the ingress talks to an LLMServer: through a Serve handle, or in-process (tests).

Both clients offer the same async methods, so the request handlers are written once.
`ServingContext` is what every handler receives: the client, the config, the metrics,
the admission counter and the model's context length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gptoss_ray.engine_api import EngineInfo, EngineStats
from gptoss_ray.metrics import ServingMetrics, endpoint_of
from gptoss_ray.output import OutputProcessor, SampleOutput
from gptoss_ray.sampling_params import SamplingParams, TokenDelta
from gptoss_ray.serve.config import ServeConfig
from gptoss_ray.serve.errors import OpenAIError

logger = logging.getLogger(__name__)


class HandleClient:
    """An LLMServer deployment behind a Serve DeploymentHandle."""

    def __init__(self, handle: Any):
        self._handle = handle

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        stream = self._handle.options(stream=True).generate.remote(request_id, prompt, params)
        done = False
        try:
            async for delta in stream:
                yield delta
            done = True
        finally:
            if not done:  # propagate our cancellation to the replica's generator
                stream.cancel()

    async def abort(self, request_id: str, index: int | None = None) -> None:
        await self._handle.abort.remote(request_id, index)

    async def stats(self) -> EngineStats:
        return await self._handle.stats.remote()

    async def info(self) -> EngineInfo:
        return await self._handle.info.remote()

    async def check_health(self) -> None:
        await self._handle.check_health.remote()


class LocalClient:
    """An LLMServer object in this process (ASGI tests, schemathesis)."""

    def __init__(self, server: Any):
        self._server = server

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        return self._server.generate(request_id, prompt, params)

    async def abort(self, request_id: str, index: int | None = None) -> None:
        await self._server.abort(request_id, index)

    async def stats(self) -> EngineStats:
        return self._server.stats()

    async def info(self) -> EngineInfo:
        return self._server.info()

    async def check_health(self) -> None:
        await self._server.check_health()


class Admission:
    """A request's place in the bounded queue; `release()` (or leaving the `with` block)
    gives it back, once. A streaming response also releases it if its body is never
    iterated (the client left before the first byte), through a finalizer on the body."""

    def __init__(self, ctx: ServingContext, num_seqs: int):
        self._ctx, self.num_seqs, self._released = ctx, num_seqs, False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._ctx._release(self.num_seqs)

    def guard(self, body: Any) -> Any:
        """Release when `body` (a streaming response's generator) is collected, whatever happened."""
        weakref.finalize(body, self.release)
        return body

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@dataclass
class ServingContext:
    config: ServeConfig
    client: Any  # HandleClient | LocalClient
    metrics: ServingMetrics
    inflight: int = 0  # generation requests admitted and not finished
    inflight_seqs: int = 0  # their sequences (prompts x n): what the bound counts
    _max_model_len: int | None = None
    _background: set = field(default_factory=set)  # abort tasks fired from cancelled requests

    @property
    def model_name(self) -> str:
        return self.config.model_name

    def check_model(self, model: str, param: str = "model") -> None:
        if model not in self.config.model_names:
            served = "', '".join(self.config.model_names)
            raise OpenAIError(404, f"The model '{model}' does not exist; this server serves '{served}'.",
                              param=param, code="model_not_found")

    async def max_model_len(self) -> int:
        if self._max_model_len is None:
            try:
                self._max_model_len = (await self.client.info()).max_model_len
            except Exception as e:  # the LLMServer replica is dead or failed to start
                logger.warning("engine info unavailable: %r", e)
                raise OpenAIError(503, "the engine is unavailable", code="engine_unavailable",
                                  headers={"Retry-After": "5"}) from None
        return self._max_model_len

    def admit(self, num_seqs: int) -> Admission:
        """Take `num_seqs` sequences (prompts x n) of the bounded queue, or answer now: 400
        when the request alone is larger than the whole bound (it could never run), 429 with
        Retry-After when the bound is full. Decided before any response starts, so a
        streaming request over capacity gets a real 429 that SDKs retry, not a 200 and an
        error event. Counting sequences, not requests: 64 prompts x n=16 is 1,024 sequences."""
        bound = self.config.max_inflight
        if num_seqs > bound:
            raise OpenAIError(400, f"this request asks for {num_seqs} sequences (prompts x n) but the server runs "
                              f"and queues at most {bound} at once; split it into smaller requests", param="n",
                              code="request_too_large")
        if self.inflight_seqs + num_seqs > bound:
            self.metrics.labels(self.metrics.rejected).inc()
            raise OpenAIError(429, f"server is at capacity ({self.inflight_seqs} of {bound} sequences in flight); "
                              "retry shortly", code="queue_full", headers={"Retry-After": "1"})
        self.inflight_seqs += num_seqs
        self.inflight += 1
        self.metrics.labels(self.metrics.inflight).set(self.inflight)
        return Admission(self, num_seqs)

    def _release(self, num_seqs: int) -> None:
        self.inflight_seqs -= num_seqs
        self.inflight -= 1
        self.metrics.labels(self.metrics.inflight).set(self.inflight)

    def abort_later(self, request_id: str, index: int | None = None, client_gone: bool = True) -> None:
        """Fire an abort (of the request, or of one sample) that nobody awaits: from a
        cancelled request, or for a sample the output processor ended on a stop string."""
        if client_gone:
            self.metrics.labels(self.metrics.aborted).inc()

        async def _abort() -> None:
            try:
                await self.client.abort(request_id, index)
            except Exception:
                logger.warning("abort of %s failed", request_id, exc_info=True)

        task = asyncio.get_running_loop().create_task(_abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       processor: OutputProcessor) -> AsyncIterator[SampleOutput]:
        """The request's output as `processor` makes it from the engine's deltas, with
        metrics observed; engine errors raised; aborted in the engine if we stop early,
        and each sample that hit a stop string aborted there as soon as it did."""
        start = last = time.monotonic()
        first, endpoint = True, endpoint_of(request_id)
        if not self.config.disable_log_requests:
            logger.info("request %s: %d prompt tokens, n=%d, max_tokens=%s, temperature=%s", request_id,
                        len(prompt), params.n, params.max_tokens, params.temperature)
        num_finished = 0
        engine_done: set[int] = set()  # samples the engine reported finished
        try:
            async with contextlib.aclosing(self.client.generate(request_id, prompt, params)) as stream:
                async for delta in stream:
                    now = time.monotonic()
                    if delta.token_ids:
                        if first:
                            self.metrics.observe_first_token(now - start, endpoint)
                        self.metrics.observe_tokens(len(delta.token_ids), None if first else now - last, endpoint)
                        first, last = False, now
                    if delta.finished:
                        engine_done.add(delta.index)
                    out = processor.process(delta)
                    if out is None:  # the engine's tail of a sample the processor ended
                        continue
                    if out.finished:
                        num_finished += 1
                        reason = "stop" if out.finish_reason == "tool_calls" else out.finish_reason  # vLLM's labels
                        self.metrics.observe_finished(reason, now - start,
                                                      out.num_prompt_tokens if num_finished == 1 else 0, endpoint)
                        if out.finish_reason == "error":
                            # the engine's text (exception names, paths) is for the log, never the client
                            logger.error("engine error on %s: %s", request_id, out.error)
                            raise OpenAIError(500, "engine error: generation failed on the server (see its log)",
                                              code="engine_error")
                        if out.finish_reason == "abort":
                            raise OpenAIError(503, "the request was aborted by the server", code="aborted")
                        if out.abort:
                            self.abort_later(request_id, out.index, client_gone=False)
                    yield out
                    if processor.finished and len(engine_done) < params.n:
                        return  # leaving closes the engine stream, which aborts what is left
        except (OpenAIError, GeneratorExit, asyncio.CancelledError):
            if not processor.finished:
                self.abort_later(request_id)
            raise
        except Exception:  # Ray errors: replica died, actor unavailable
            logger.exception("engine call for %s failed", request_id)
            self.abort_later(request_id)
            raise OpenAIError(503, "the engine is unavailable", code="engine_unavailable",
                              headers={"Retry-After": "5"}) from None
