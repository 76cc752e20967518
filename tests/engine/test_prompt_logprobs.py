"""prompt_logprobs (vLLM's SamplingParams field): each prompt token's logprob given the
tokens before it, computed in the prefill, against transformers' log-softmax over the
whole prompt on the same checkpoint; whole, in chunks, and behind a prefix-cache hit."""

from __future__ import annotations

import functools

import pytest
import torch
from support.engine_helpers import drain, make_engine, prompt

from gptoss_ray.sampling_params import SamplingParams

PROMPT_LEN = 45  # several blocks of 4, beyond the sliding window (8), three 16-token chunks
TOP = 3


@functools.cache
def reference(ckpt: str, tokens: tuple[int, ...]) -> torch.Tensor:
    """transformers' log-softmax at every position of the prompt [P, V], float32."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf = GptOssForCausalLM.from_pretrained(ckpt, quantization_config=Mxfp4Config(dequantize=True),
                                           dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        logits = hf(torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    deltas = []
    for rid, (tokens, params) in requests.items():
        engine.add_request(rid, tokens, params)
    drain(engine, deltas_out=deltas)
    return deltas


def first_delta(deltas, rid, index=0):
    return next(d for d in deltas if d.request_id == rid and d.index == index)


def assert_matches_reference(ckpt, tokens: list[int], entries):
    ref = reference(str(ckpt), tuple(tokens))
    assert len(entries) == len(tokens) and entries[0] is None
    for p in range(1, len(tokens)):
        entry = entries[p]
        assert entry is not None, f"prompt position {p} missing"
        assert entry[tokens[p]] == pytest.approx(float(ref[p - 1, tokens[p]]), abs=1e-4)
        top_v, top_i = ref[p - 1].topk(TOP)
        for t, v in zip(top_i.tolist(), top_v.tolist()):
            assert entry[t] == pytest.approx(v, abs=1e-4)
        assert set(entry) <= set(top_i.tolist()) | {tokens[p]}


PARAMS = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=TOP)


@pytest.mark.parametrize("chunk", [256, 16])  # one prefill step; three chunks, two of them not sampled
def test_prompt_logprobs_match_transformers(tiny_ckpt, chunk):
    tokens = prompt(PROMPT_LEN, seed=11)
    deltas = run(make_engine(tiny_ckpt, dtype="float32", max_num_batched_tokens=chunk), {"r": (tokens, PARAMS)})
    assert_matches_reference(tiny_ckpt, tokens, first_delta(deltas, "r").prompt_logprobs)
    # once per sample, with its first delta only
    assert [d.prompt_logprobs is not None for d in deltas if d.request_id == "r"] == [True] + [False] * (len(
        [d for d in deltas if d.request_id == "r"]) - 1)


def test_prefix_cache_hit_still_computes_every_position(tiny_ckpt):
    engine = make_engine(tiny_ckpt, dtype="float32")
    tokens = prompt(PROMPT_LEN, seed=12)
    plain = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    run(engine, {"warm": (tokens, plain)})
    again = run(engine, {"cached": (tokens, plain)})
    assert first_delta(again, "cached").num_cached_tokens > 0  # the prompt's blocks are cached
    deltas = run(engine, {"lp": (tokens, PARAMS)})
    assert_matches_reference(tiny_ckpt, tokens, first_delta(deltas, "lp").prompt_logprobs)
    assert first_delta(deltas, "lp").num_cached_tokens == 0


def test_every_sample_gets_them_and_other_requests_do_not(tiny_ckpt):
    tokens, other = prompt(PROMPT_LEN, seed=13), prompt(20, seed=14)
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=3, ignore_eos=True, prompt_logprobs=0)
    deltas = run(make_engine(tiny_ckpt, dtype="float32", max_num_batched_tokens=16),
                 # "plain" first: "lp"'s rows sit after others' in the packed batch
                 {"plain": (other, SamplingParams(max_tokens=3, ignore_eos=True)), "lp": (tokens, params)})
    first, second = first_delta(deltas, "lp", 0).prompt_logprobs, first_delta(deltas, "lp", 1).prompt_logprobs
    assert first == second and first[0] is None
    ref = reference(str(tiny_ckpt), tuple(tokens))
    assert [set(e) for e in first[1:]] == [{t} for t in tokens[1:]]  # prompt_logprobs=0: the token alone
    assert all(e[t] == pytest.approx(float(ref[p, t]), abs=1e-4) for p, (e, t) in enumerate(zip(first[1:], tokens[1:])))
    assert all(d.prompt_logprobs is None for d in deltas if d.request_id == "plain")
