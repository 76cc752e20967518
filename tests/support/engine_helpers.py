"""Shared by the engine tests: build a small engine on the tiny checkpoint, run it to the end."""

from __future__ import annotations

import functools

import torch

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.sampling_params import SamplingParams, TokenDelta

torch.set_num_threads(1)

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def make_engine(ckpt, **kwargs) -> LLMEngine:
    # Small blocks so that short prompts span several blocks and the tiny model's
    # sliding window (8 tokens) recycles blocks.
    defaults = dict(model=str(ckpt), block_size=4, num_kv_blocks=256, max_model_len=256,
                    max_num_batched_tokens=256, max_num_seqs=64)
    return LLMEngine(EngineConfig(**(defaults | kwargs)))


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200000, (length,), generator=g).tolist()


def run_all(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
            on_step=None) -> dict[tuple[str, int], list[int]]:
    """Add every request, step to the end; (request id, sample index) -> output tokens."""
    for rid, (tokens, params) in requests.items():
        engine.add_request(rid, tokens, params)
    return drain(engine, on_step)


def drain(engine: LLMEngine, on_step=None,
          deltas_out: list[TokenDelta] | None = None) -> dict[tuple[str, int], list[int]]:
    out: dict[tuple[str, int], list[int]] = {}
    while engine.has_unfinished_requests():
        deltas = engine.step()
        if on_step is not None:
            on_step(engine, deltas)
        for d in deltas:
            out.setdefault((d.request_id, d.index), []).extend(d.token_ids)
            if deltas_out is not None:
                deltas_out.append(d)
    return out


@functools.cache
def _reference_model(ckpt: str):
    from gptoss_ray.model.loader import load_model

    return load_model(ckpt)


def greedy_by_recompute(ckpt, tokens: list[int], num_new: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence with the model at every step
    (no cache reuse between steps): the slow twin of the engine's incremental decode."""
    from gptoss_ray.model.attention import allocate_kv_cache, contiguous_metadata

    model = _reference_model(str(ckpt))
    tokens = list(tokens)
    for _ in range(num_new):
        n = len(tokens)
        block_size, max_blocks = 16, -(-n // 16)
        caches = allocate_kv_cache(model.config, {"full_attention": max_blocks, "sliding_attention": max_blocks},
                                   block_size, torch.float32)
        attn = contiguous_metadata([n], [n], block_size, max_blocks)
        hidden = model(torch.tensor(tokens), torch.arange(n), attn, caches)
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return tokens[-num_new:]


def logsoftmax_by_recompute(ckpt, tokens: list[int]) -> torch.Tensor:
    """[P, V] log-softmax at every position of `tokens`, one forward over all of them."""
    from gptoss_ray.model.attention import allocate_kv_cache, contiguous_metadata

    model = _reference_model(str(ckpt))
    n, block_size = len(tokens), 16
    max_blocks = -(-n // block_size)
    caches = allocate_kv_cache(model.config, {"full_attention": max_blocks, "sliding_attention": max_blocks},
                               block_size, torch.float32)
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens), torch.arange(n), contiguous_metadata([n], [n], block_size, max_blocks),
                       caches)
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)
