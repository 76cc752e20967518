"""A scripted engine with the AsyncLLMEngine interface, for serve tests and demos.

A real tiny checkpoint writes random tokens, so parsing is tested by feeding known
harmony token streams through the same server path. The script is chosen by a marker in
the prompt, `[[script:NAME]]` (the last one wins), so a test picks it per request through
the public API; unmarked prompts get SCRIPTS["default"]. Like the real engine, it honours
max_tokens, stop token ids, min_tokens and n, leaves stop strings to the output processor
(which aborts a sample that hit one), and keeps KV-block accounting, so that abort and
/metrics behave observably. `debug_*` methods are read by tests through
LLMServer.debug.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine_api import EngineStats, StepClock
from gptoss_ray.harmony.encoding import decode, get_encoding
from gptoss_ray.sampling_params import SamplingParams, TokenDelta

_A = "<|channel|>analysis<|message|>"
_NEXT = "<|end|><|start|>assistant"
SCRIPTS = {
    "default": f"{_A}The user greets me.{_NEXT}<|channel|>final<|message|>Hello from the scripted engine!<|return|>",
    "reasoning_final": f"{_A}Two plus two is four.{_NEXT}<|channel|>final<|message|>The answer is 4.<|return|>",
    "tool_call": (f"{_A}I need the weather tool.{_NEXT} to=functions.get_weather<|channel|>commentary "
                  '<|constrain|>json<|message|>{"city": "Paris", "unit": "celsius"}<|call|>'),
    "two_calls": (f"{_A}Two lookups.{_NEXT} to=functions.get_weather<|channel|>commentary <|constrain|>json"
                  '<|message|>{"city": "Paris"}<|call|><|start|>assistant to=functions.get_time<|channel|>commentary '
                  '<|constrain|>json<|message|>{"timezone": "Europe/Rome"}<|call|>'),
    "after_tool": f"{_A}The tool said 21C.{_NEXT}<|channel|>final<|message|>It is 21C in Paris.<|return|>",
    "malformed": f"{_A}ok{_NEXT}garbled text <|message|> without a header<|return|>",
    "plain": "Just plain text, no harmony at all.<|return|>",
    # ends inside the final channel: the engine stops at max_tokens (or here, at the script's end)
    "stop_mid_channel": f"{_A}Counting.{_NEXT}<|channel|>final<|message|>one two three four five six seven",
    "stop_string": f"{_A}r{_NEXT}<|channel|>final<|message|>alpha beta STOP gamma delta<|return|>",
    # " marqué" is one token: a stop string inside it cuts the token's text
    "accent": f"{_A}Pense STOP à marquer.{_NEXT}<|channel|>final<|message|> marqué de STOP fin<|return|>",
    "slow": f"{_A}" + " ".join(["thinking"] * 600) + "<|end|>",
    # a stop string early in a long, slow reply: only an abort ends it soon
    "slow_stop": f"{_A}r{_NEXT}<|channel|>final<|message|>alpha STOP " + " ".join(["more"] * 600),
    "error": "<|channel|>final<|message|>partial",
    # its first step stalls STALL_S (bounded): longer than a short step_timeout_s, so /health turns 503
    "stall": f"{_A}Stalled, then fine.{_NEXT}<|channel|>final<|message|>Back.<|return|>",
}
SLOW_DELAY_S = 0.02
STALL_S = 4.0
_MARKER = re.compile(r"\[\[script:(\w+)\]\]")


class ScriptedEngine:
    """AsyncLLMEngine stand-in; see the module docstring."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.max_model_len = config.max_model_len or 4096
        self.block_size = config.block_size
        self.num_total_blocks = config.num_kv_blocks or 1024
        self.tokens_per_step = 3  # several tokens per delta, like a multi-token step
        self._held: dict[str, int] = {}  # request id -> KV blocks it holds
        self._prompts: list[dict] = []
        self._aborted: list[str] = []
        self._aborted_samples: set[tuple[str, int]] = set()
        self._finished: list[str] = []
        self.dead = False
        self._num_requests = 0
        self._step = StepClock()  # the real engine's stall rule: check_health reads it

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenDelta]:
        if self.dead:
            raise RuntimeError("scripted engine is dead")
        self._prompts.append({"request_id": request_id, "prompt_token_ids": list(prompt_token_ids), "params": asdict(params)})
        self._num_requests += 1
        matches = _MARKER.findall(decode(prompt_token_ids))
        name = matches[-1] if matches else "default"
        script = get_encoding().encode(SCRIPTS[name], allowed_special="all")
        self._held[request_id] = math.ceil(len(prompt_token_ids) / self.block_size)
        # the prompt's logprobs, when asked: -1 for each prompt token, -2 for the token after it
        prompt_lp = ([None] + [{t: -1.0, (t + 1) % 200000: -2.0} for t in prompt_token_ids[1:]]
                     if params.prompt_logprobs is not None else None)
        streams = [self._one(request_id, i, script, params, len(prompt_token_ids), name, prompt_lp)
                   for i in range(params.n)]
        for stream in streams:  # samples one after the other: simple and still ordered per index
            async for delta in stream:
                if request_id not in self._held:  # aborted while we waited
                    return
                yield delta
        # Like the real engine, blocks are freed when a request finishes or is aborted,
        # not when its output iterator is dropped: a caller that goes away must abort.
        self._held.pop(request_id, None)
        self._finished.append(request_id)

    async def _one(self, request_id: str, index: int, script: list[int], params: SamplingParams,
                   num_prompt: int, name: str, prompt_lp: list | None = None) -> AsyncIterator[TokenDelta]:
        out: list[int] = []
        limit = params.max_tokens or self.max_model_len - num_prompt
        for start in range(0, len(script), self.tokens_per_step):
            await asyncio.sleep(SLOW_DELAY_S if name.startswith("slow") else 0)
            if name == "stall" and start == 0:  # a step that does not finish in the step timeout
                self._step.start()
                try:
                    await asyncio.sleep(STALL_S)
                finally:
                    self._step.stop()
            if (request_id, index) in self._aborted_samples:
                yield TokenDelta(request_id=request_id, index=index, finish_reason="abort", num_prompt_tokens=num_prompt)
                return
            step = script[start:start + self.tokens_per_step][: limit - len(out)]
            finish, stop_reason = None, None
            for k, token in enumerate(step):
                if token in params.stop_token_ids and len(out) + k + 1 >= params.min_tokens:
                    step, finish, stop_reason = step[: k + 1], "stop", token
                    break
            out += step
            self._held[request_id] = math.ceil((num_prompt + len(out)) / self.block_size)
            if finish is None and len(out) >= limit:
                finish = "length"
            if finish is None and start + self.tokens_per_step >= len(script):
                finish = "error" if name == "error" else "length"
            logprobs = [{t: -0.5, (t + 1) % 200000: -1.5} for t in step] if params.logprobs is not None else None
            yield TokenDelta(request_id=request_id, index=index, token_ids=step, logprobs=logprobs,
                             finish_reason=finish, stop_reason=stop_reason,
                             error="scripted engine failure" if finish == "error" else None,
                             num_prompt_tokens=num_prompt, prompt_logprobs=prompt_lp if start == 0 else None)
            if finish is not None:
                return

    async def abort(self, request_id: str, index: int | None = None) -> None:
        if index is not None:  # one sample (a stop string hit): it ends at its next step
            if request_id in self._held:
                self._aborted_samples.add((request_id, index))
                self._aborted.append(f"{request_id}#{index}")
            return
        if self._held.pop(request_id, None) is not None:
            self._aborted.append(request_id)

    def stats(self) -> EngineStats:
        used = sum(self._held.values())
        return EngineStats(
            num_running=len(self._held), num_waiting=0, kv_usage=used / self.num_total_blocks,
            num_free_blocks=self.num_total_blocks - used, num_total_blocks=self.num_total_blocks,
            expert_load=[[self._num_requests, 0], [0, self._num_requests]],
        )

    async def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("scripted engine is dead")
        self._step.check(self.config.step_timeout_s)

    async def shutdown(self) -> None:
        self._held.clear()

    # --- test introspection (LLMServer.debug) ---------------------------------------

    def debug_prompts(self) -> list[dict]:
        return self._prompts

    def debug_aborted(self) -> list[str]:
        return self._aborted

    def debug_finished(self) -> list[str]:
        return self._finished


class SlowLoadingEngine(ScriptedEngine):
    """A ScriptedEngine whose construction takes 10 minutes, like a large checkpoint loading:
    for tests of what `serve` does while a model loads (Ctrl-C must not wait for it)."""

    def __init__(self, config: EngineConfig):
        import time

        time.sleep(600)
        super().__init__(config)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_serve_app(args: dict, app_name: str = "gptoss", ray_init: dict | None = None) -> Iterator[str]:
    """Start Ray (small logical resources), Serve on a free 127.0.0.1 port and the app;
    yield its base URL ("http://127.0.0.1:PORT"); shut everything down after."""
    import ray
    from ray import serve

    from gptoss_ray.serve.app import build_app

    port = free_port()
    ray.init(**{"num_cpus": 4, "include_dashboard": False, "log_to_driver": False, **(ray_init or {})})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


class FailingEngine(ScriptedEngine):
    """A ScriptedEngine whose construction fails, like a checkpoint that passes `serve`'s
    pre-checks but not the load in the replica: for tests of how `serve` reports it."""

    def __init__(self, config: EngineConfig):
        raise RuntimeError("scripted engine failed to load its checkpoint")
