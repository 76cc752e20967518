"""Expert parallelism on GPUs (NCCL): skipped unless the machine has at least 2 CUDA devices.

The same check as the CPU test, one GPU per rank: greedy tokens over 2 ranks equal one
rank's, logprobs close (fp32, Triton kernels; the all-to-all changes summation order)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from gptoss_ray.engine.llm import LLM  # noqa: E402
from gptoss_ray.sampling_params import SamplingParams  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA devices"),
]

PROMPTS = [[1, 2, 3, 4, 5], [7] * 11, [9, 8, 7], list(range(100, 120))]


def _generate(ckpt, ep_size: int):
    with LLM(model=str(ckpt), ep_size=ep_size, dtype="float32", device="cuda", num_kv_blocks=64,
             max_model_len=256, max_num_seqs=8) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, logprobs=1))
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def test_two_gpu_ranks_match_one(tiny_moe_ckpt):
    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    try:
        one, two = _generate(tiny_moe_ckpt, 1), _generate(tiny_moe_ckpt, 2)
    finally:
        ray.shutdown()
    for (tokens, logprobs), (got_tokens, got_logprobs) in zip(one, two):
        assert got_tokens == tokens
        for expected, got in zip(logprobs, got_logprobs):
            for token, lp in expected.items():
                assert got[token] == pytest.approx(lp, abs=1e-3)
