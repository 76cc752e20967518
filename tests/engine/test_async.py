"""AsyncLLMEngine: the interface the serve layer uses, on the real tiny model."""

from __future__ import annotations

import asyncio

import pytest
from support.engine_helpers import make_engine, prompt, run_all

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine.async_engine import AsyncLLMEngine, EngineDeadError
from gptoss_ray.engine_api import EngineStats
from gptoss_ray.errors import SamplingParamsError
from gptoss_ray.sampling_params import SamplingParams

def config(ckpt, **kw) -> EngineConfig:
    return EngineConfig(**({"model": str(ckpt), "block_size": 4, "num_kv_blocks": 256, "max_model_len": 256} | kw))


async def collect(engine, rid, tokens, params):
    deltas = [d async for d in engine.generate(rid, tokens, params)]
    out: dict[int, list[int]] = {}
    for d in deltas:
        out.setdefault(d.index, []).extend(d.token_ids)
    return out, deltas


def test_concurrent_requests_match_the_sync_engine(tiny_ckpt):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=8, ignore_eos=True)
    reqs = {f"r{i}": (prompt(4 + 3 * i, seed=i), seeded if i % 3 == 0 else params) for i in range(8)}
    expected = run_all(make_engine(tiny_ckpt), reqs)

    async def main():
        engine = AsyncLLMEngine(config(tiny_ckpt))
        ticks = 0

        async def ticker():  # the event loop keeps running while the engine steps
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        results = await asyncio.gather(*(collect(engine, rid, *req) for rid, req in reqs.items()))
        tick_task.cancel()
        stats = engine.stats()
        await engine.shutdown()
        return results, stats, ticks

    results, stats, ticks = asyncio.run(main())
    for (rid, _), (out, deltas) in zip(reqs.items(), results):
        for index, tokens in out.items():
            assert tokens == expected[(rid, index)]
        assert sum(d.finished for d in deltas) == len(out)
    assert ticks > 10
    assert isinstance(stats, EngineStats) and stats.num_running == 0
    assert stats.expert_load is not None and len(stats.expert_load) == 2


def test_abort_ends_the_stream_and_frees_blocks(tiny_ckpt):
    async def main():
        engine = AsyncLLMEngine(config(tiny_ckpt))
        total = engine.stats().num_total_blocks
        gen = engine.generate("long", prompt(20, seed=1), SamplingParams(max_tokens=200, ignore_eos=True))
        first = await gen.__anext__()
        assert not first.finished
        await engine.abort("long")
        assert engine.stats().num_free_blocks == total  # freed by the time abort returns
        rest = [d async for d in gen]
        await engine.shutdown()
        return rest

    rest = asyncio.run(main())
    assert rest[-1].finish_reason == "abort"


def test_consumer_leaving_early_aborts_the_request(tiny_ckpt):
    async def main():
        engine = AsyncLLMEngine(config(tiny_ckpt))
        gen = engine.generate("r", prompt(10, seed=2), SamplingParams(max_tokens=200, ignore_eos=True))
        async for _ in gen:
            break
        await gen.aclose()
        await engine.abort("sync-point")  # runs after the abort the generator sent
        stats = engine.stats()
        await engine.shutdown()
        return stats

    stats = asyncio.run(main())
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_invalid_request_raises_naming_the_param_and_engine_stays_up(tiny_ckpt):
    async def main():
        engine = AsyncLLMEngine(config(tiny_ckpt))
        with pytest.raises(SamplingParamsError) as err:
            await collect(engine, "bad", list(range(250)), SamplingParams(max_tokens=50))
        assert err.value.param == "max_tokens"
        out, _ = await collect(engine, "good", prompt(5, seed=3), SamplingParams(max_tokens=3, ignore_eos=True))
        await engine.check_health()
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await collect(engine, "late", prompt(5, seed=3), SamplingParams(max_tokens=3))
        return out

    assert len(asyncio.run(main())[0]) == 3


def test_max_model_len_is_exposed(tiny_ckpt):
    async def main():
        engine = AsyncLLMEngine(config(tiny_ckpt, max_model_len=100))
        value = engine.max_model_len
        await engine.shutdown()
        return value

    assert asyncio.run(main()) == 100


def test_a_failing_step_ends_requests_with_error_and_health_check_fails(tiny_ckpt):
    from gptoss_ray.engine.engine import build_worker_config
    from gptoss_ray.engine.executor import InProcessExecutor

    class Broken(InProcessExecutor):  # the real worker, with a bug injected at its 3rd step
        steps = 0

        def execute(self, plan):
            self.steps += 1
            if self.steps == 3:
                raise RuntimeError("injected bug")
            return super().execute(plan)

    async def main():
        cfg = config(tiny_ckpt)
        engine = AsyncLLMEngine(cfg, executor=Broken(build_worker_config(cfg)[0]))
        _, deltas = await collect(engine, "r", prompt(5, seed=1), SamplingParams(max_tokens=20, ignore_eos=True))
        with pytest.raises(EngineDeadError):
            await engine.check_health()
        await engine.shutdown()
        return deltas

    deltas = asyncio.run(main())
    assert deltas[-1].finish_reason == "error" and "injected bug" in deltas[-1].error
    assert sum(len(d.token_ids) for d in deltas) == 2


def test_health_fails_while_a_step_runs_past_the_step_timeout(tiny_ckpt):
    """A step that does not finish (a hung worker the executor's own timeout missed, or work
    stuck on the loop thread) turns check_health into an error after step_timeout_s, so
    /health answers 503 and Serve replaces the replica; once the step ends it is healthy."""
    import threading
    import time

    from gptoss_ray.engine.async_engine import EngineStalledError
    from gptoss_ray.engine.engine import build_worker_config
    from gptoss_ray.engine.executor import InProcessExecutor

    cfg = config(tiny_ckpt, step_timeout_s=0.5)
    release, stuck = threading.Event(), threading.Event()

    class HangsOnThirdStep(InProcessExecutor):
        calls = 0

        def execute(self, plan):
            HangsOnThirdStep.calls += 1
            if HangsOnThirdStep.calls == 3:  # past the warm-up steps, which get longer
                stuck.set()
                release.wait(120)
            return super().execute(plan)

    async def main():
        engine = AsyncLLMEngine(cfg, executor=HangsOnThirdStep(build_worker_config(cfg)[0]))
        await engine.check_health()
        task = asyncio.ensure_future(collect(engine, "r", prompt(5, seed=1),
                                             SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)))
        await asyncio.to_thread(stuck.wait, 120)
        end = time.monotonic() + 60  # bounds a hang only
        while True:
            try:
                await engine.check_health()
            except EngineStalledError as e:
                assert "has not finished" in str(e)
                break
            assert time.monotonic() < end, "health never noticed the stalled step"
            await asyncio.sleep(0.1)
        release.set()
        out, _ = await task
        await engine.check_health()
        await engine.shutdown()
        return out

    out = asyncio.run(main())
    assert len(out[0]) == 6
