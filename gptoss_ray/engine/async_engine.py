"""The engine behind an asyncio API: what the serve layer's LLMServer replica holds.

The step loop runs in one background thread (a forward pass holds the GIL only between
torch ops, so the event loop stays responsive). Callers never touch the LLMEngine
directly: adds and aborts are commands the loop thread runs between steps, each with a
future for its outcome; deltas come back through one asyncio.Queue per request, fed with
call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.engine_api import EngineStalledError, EngineStats, StepClock  # noqa: F401 (EngineStalledError: re-exported)
from gptoss_ray.sampling_params import SamplingParams, TokenDelta

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    n: int  # samples of the request
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineDeadError(RuntimeError):
    """The step loop stopped on an error (or was shut down); the replica must be replaced."""


# The first steps of a (re)started engine may compile kernels; as the worker group allows.
_WARMUP_STEPS = 2
_WARMUP_STEP_TIMEOUT_S = 300.0


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, executor=None):
        self.engine = LLMEngine(config, executor)
        self.max_model_len: int = self.engine.max_model_len
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self._error: BaseException | None = None
        self._step = StepClock()
        self._thread = threading.Thread(target=self._loop, name="gptoss-engine-loop", daemon=True)
        self._thread.start()

    # --- the API ----------------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenDelta]:
        """Deltas of every sample of the request until all have finished. Leaving the
        iteration early (client gone, task cancelled) aborts the request."""
        self._check_alive()
        stream = _Stream(asyncio.get_running_loop(), params.n)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self._streams[request_id] = stream
        try:
            await self._call("add", request_id, list(prompt_token_ids), params)
        except BaseException as e:
            self._streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):  # the add may still run: undo it
                self._send("abort", request_id)
            raise
        remaining = params.n
        try:
            while remaining:
                delta: TokenDelta = await stream.queue.get()
                yield delta
                if delta.finish_reason == "error":
                    return
                remaining -= delta.finished
        finally:
            self._streams.pop(request_id, None)
            if remaining:  # the consumer left early
                self._send("abort", request_id)

    async def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or its sample `index`); its blocks are free when this returns."""
        if self._error is None and not self._stopping:
            await self._call("abort", request_id, index)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def check_health(self) -> None:
        """Raise when the engine cannot serve: dead, or stuck in a step past the step
        timeout (whatever holds it: a hung worker the executor's own timeout missed, or
        work on the loop thread itself), so /health turns 503 and Serve replaces it."""
        self._check_alive()
        self._check_not_stalled()
        await asyncio.to_thread(self.engine.executor.check_health)

    def _check_not_stalled(self) -> None:
        limit = self.engine.config.step_timeout_s
        if self.engine.num_steps <= _WARMUP_STEPS:
            limit = max(limit, _WARMUP_STEP_TIMEOUT_S)
        self._step.check(limit)

    async def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._wakeup.set()
        await asyncio.to_thread(self._thread.join)
        self._fail_streams("abort", None)
        self.engine.shutdown()

    # --- plumbing ---------------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"engine stopped after an error: {self._error!r}") from self._error
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError("engine is shut down")

    def _send(self, *command: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((future, *command))
        self._wakeup.set()
        return future

    async def _call(self, *command: Any) -> Any:
        return await asyncio.wrap_future(self._send(*command))

    def _loop(self) -> None:
        while not self._stopping:
            self._wakeup.clear()  # before draining: a command sent after this wakes the wait below
            self._run_commands()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(timeout=1.0)
                continue
            self._step.start()
            try:
                deltas = self.engine.step()
            except Exception as e:  # a bug or a dead worker: every request fails, the replica is dead
                logger.exception("engine step failed")
                self._error = e
                self._fail_streams("error", f"engine step failed: {e!r}")
                return
            finally:
                self._step.stop()
            self._deliver(deltas)

    def _run_commands(self) -> None:
        while True:
            try:
                future, kind, request_id, *args = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if kind == "add":
                    self.engine.add_request(request_id, *args)
                else:
                    self._deliver(self.engine.abort_request(request_id, *args))
                future.set_result(None)
            except Exception as e:
                future.set_exception(e)

    def _deliver(self, deltas: list[TokenDelta]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, TokenDelta]]] = {}
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, delta))
        for loop, items in by_loop.items():  # one wake-up per event loop per step
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _fail_streams(self, reason: str, error: str | None) -> None:
        deltas = [TokenDelta(rid, index, finish_reason=reason, error=error)
                  for rid, stream in list(self._streams.items()) for index in range(stream.n)]
        self._deliver(deltas)


def _put_all(items: list[tuple[asyncio.Queue, TokenDelta]]) -> None:
    for q, delta in items:
        q.put_nowait(delta)
