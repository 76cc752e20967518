"""Shared by the expert-parallel tests: engines built the way users build them, and a
run of PROMPTS (the fixtures `ray_cluster` and `reference` are in conftest.py)."""

from __future__ import annotations

from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.engine.executor import InProcessExecutor
from gptoss_ray.engine.llm import LLM
from gptoss_ray.engine.ray_executor import RayExecutor
from gptoss_ray.sampling_params import SamplingParams

# Several concurrent requests of different prompt and output lengths.
PROMPTS = [[1, 2, 3, 4, 5], [7] * 11, [9, 8, 7], list(range(100, 120)), [42, 43], list(range(300, 309))]


def make_engine(ckpt, ep_size: int, **overrides) -> LLMEngine:
    """Built the way users build it, `LLM(model=..., ep_size=N)`; its engine is driven
    step by step below. Experts stay MXFP4-packed, as on the GPUs expert parallelism is for
    (and so each rank's expert bytes are the checkpoint's)."""
    config = dict(worker_num_cpus=0.1, num_kv_blocks=64, max_model_len=256, max_num_seqs=8, device="cpu",
                  dequantize_experts=False)
    engine = LLM(model=str(ckpt), ep_size=ep_size, dtype="float32", **(config | overrides)).engine
    assert isinstance(engine.executor, RayExecutor if ep_size > 1 else InProcessExecutor)
    return engine


def generate(engine: LLMEngine, prompts=PROMPTS, tag="r") -> tuple[dict, set[int]]:
    """Run prompts together to completion; return request -> (tokens, logprobs), and the
    ranks their sequences were placed on."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{i}", prompt, SamplingParams(temperature=0, max_tokens=4 + 2 * i, logprobs=2))
    outputs, ranks = {}, set()
    while engine.has_unfinished_requests():
        deltas = engine.step()
        ranks |= {seq.rank for seq in engine.scheduler.running}
        for d in deltas:
            tokens, logprobs = outputs.setdefault(d.request_id, ([], []))
            tokens.extend(d.token_ids)
            logprobs.extend(d.logprobs)
    return outputs, ranks
