"""The engine as the serve layer sees it: the `Engine` protocol LLMServer drives, and the
typed stats and info that come back across the Ray handle.

Torch-free and plain data, so the ingress (which never imports torch) and /metrics read
the same types the engine fills. AsyncLLMEngine (engine/async_engine.py) and the scripted
engine of the serve tests (serve/testing.py) implement `Engine`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from gptoss_ray.config import EngineConfig
from gptoss_ray.sampling_params import SamplingParams, TokenDelta


@dataclass(frozen=True)
class ExpertParallelStats:
    """All-to-all cost of an expert-parallel instance: the last step, and means since start."""

    ep_size: int  # ranks (Ray actors)
    expert_ranges: list[tuple[int, int]]  # [start, stop) of the experts each rank owns
    num_steps: int  # steps since start (or since reset_stats)
    num_rebuilds: int  # worker groups replaced after a failure
    last_step_all_to_all_s: float  # slowest rank's time inside MoE collectives
    last_step_wire_bytes: int  # bytes all ranks sent to other ranks
    mean_all_to_all_s_per_step: float
    mean_wire_bytes_per_step: float
    mean_pair_wire_bytes_per_step: float  # what a per-pair dispatch would have sent
    mean_control_overhead_s_per_step: float  # driver wall time minus the slowest rank's work


@dataclass(frozen=True)
class EngineStats:
    """Engine state when asked (read by /metrics: vllm:num_requests_running, ...).
    Counters are cumulative since the engine started."""

    num_running: int = 0  # sequences holding KV blocks
    num_waiting: int = 0  # sequences queued
    kv_usage: float = 0.0  # fraction of full-attention KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    prefix_cache_hits: int = 0  # prompt tokens found in the prefix cache
    prefix_cache_queries: int = 0  # prompt tokens looked up
    num_preemptions: int = 0
    expert_load: list[list[int]] | None = None  # [layer][expert] tokens routed; None before a report
    ep: ExpertParallelStats | None = None  # None with one rank


@dataclass(frozen=True)
class EngineInfo:
    """What the ingress needs to know of the model instance once."""

    max_model_len: int  # longest sequence (prompt + output) the engine accepts


class Engine(Protocol):
    """What an LLMServer replica holds (built by an `EngineFactory` from the EngineConfig)."""

    max_model_len: int

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Deltas of every sample until all have finished; leaving early aborts the request."""
        ...

    async def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request, or only its sample `index` (one the output processor ended on a
        stop string); its KV blocks are free when this returns."""
        ...

    def stats(self) -> EngineStats: ...

    async def check_health(self) -> None:
        """Raise when the engine cannot serve (Serve then replaces the replica)."""
        ...

    async def shutdown(self) -> None: ...


EngineFactory = Callable[[EngineConfig], Engine]


class EngineStalledError(RuntimeError):
    """A step has run longer than the step timeout: /health and Serve's health check say so."""


class StepClock:
    """When the engine step in progress started, so a health check can tell a step that
    never finishes (a hung worker the executor's own timeout missed, or work stuck on the
    loop thread) from a slow one. One home for the rule, shared by AsyncLLMEngine and the
    scripted engine, so the live /health test exercises the same check."""

    def __init__(self) -> None:
        self.started: float | None = None  # monotonic start of the step in progress, if any

    def start(self) -> None:
        self.started = time.monotonic()

    def stop(self) -> None:
        self.started = None

    def check(self, limit_s: float) -> None:
        """Raise EngineStalledError when the step in progress has run past `limit_s`."""
        started = self.started
        if started is None:
            return
        running = time.monotonic() - started
        if running > limit_s:
            raise EngineStalledError(f"the engine step started {running:.0f} s ago has not finished "
                                     f"(step timeout {limit_s:.0f} s)")
