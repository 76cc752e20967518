"""The offline API (`from gptoss_ray import LLM`) and `gptoss-ray generate`."""

from __future__ import annotations

import math

import pytest
from support.engine_helpers import prompt

from gptoss_ray import LLM, SamplingParams
from gptoss_ray.cli import main as cli_main
from gptoss_ray.errors import ConfigError


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    with LLM(model=str(tiny_ckpt), dtype="float32", ep_size=1, num_kv_blocks=128, max_model_len=256) as llm:
        yield llm


def test_generate_returns_one_output_per_prompt_in_order(llm):
    prompts = [prompt(n, seed=n) for n in (30, 3, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, out in zip(prompts, outs):
        sample = out.outputs[0]
        assert len(sample.token_ids) == 12 and sample.finish_reason == "length"
        assert len(sample.logprobs) == 12
        for token, entry in zip(sample.token_ids, sample.logprobs):
            assert token in entry and 1 <= len(entry) <= 2
            assert all(isinstance(k, int) and isinstance(v, float) and v <= 0 for k, v in entry.items())
        alone = llm.generate(prompt_token_ids=[p], sampling_params=params)[0].outputs[0]
        assert alone.token_ids == sample.token_ids
        assert all(math.isclose(a[t], b[t], abs_tol=1e-4)
                   for t, a, b in zip(sample.token_ids, alone.logprobs, sample.logprobs))


def test_prompt_logprobs_on_the_request_output(llm, tiny_ckpt):
    from support.engine_helpers import logsoftmax_by_recompute

    tokens = prompt(20, seed=3)
    out = llm.generate(prompt_token_ids=[tokens], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    ref = logsoftmax_by_recompute(tiny_ckpt, tokens)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(tokens)
    assert all(math.isclose(entry[t], float(ref[p, t]), abs_tol=1e-4)
               for p, (entry, t) in enumerate(zip(out.prompt_logprobs[1:], tokens[1:])))


def test_per_prompt_params_and_n(llm):
    outs = llm.generate(prompt_token_ids=[prompt(5, seed=1), prompt(6, seed=2)],
                        sampling_params=[SamplingParams(max_tokens=2, ignore_eos=True),
                                         SamplingParams(n=3, seed=1, max_tokens=4, ignore_eos=True)])
    assert [len(o.outputs) for o in outs] == [1, 3]
    assert [len(s.token_ids) for s in outs[1].outputs] == [4, 4, 4]
    assert outs[0].outputs[0].logprobs is None


def test_bad_engine_argument_is_one_clear_error(tiny_ckpt):
    with pytest.raises(ConfigError, match="block_sise"):
        LLM(model=str(tiny_ckpt), block_sise=8)


def test_generate_cli_prints_the_parsed_reply(tiny_ckpt, capsys):
    rc = cli_main(["generate", "--model", str(tiny_ckpt), "--prompt", "Why is the sky blue?",
                   "--reasoning-effort", "low", "--max-tokens", "8", "--temperature", "0", "--show-tokens"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "[final]" in captured.out
    assert "8 generated" in captured.err


def test_text_and_stop_strings_go_through_the_output_processor(llm):
    from gptoss_ray.harmony.encoding import decode

    params = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    base = llm.generate(prompt_token_ids=[prompt(9, seed=3)], sampling_params=SamplingParams(**params))[0].outputs[0]
    assert base.text == decode(base.token_ids) and len(base.token_ids) == 16
    pieces = [decode(base.token_ids[:k]) for k in range(17)]
    k = next(i for i in range(4, 16) if len(pieces[i + 1]) - len(pieces[i]) >= 2)  # a token of 2+ characters
    stop = pieces[k + 1][len(pieces[k]) + 1:][:3]  # starts inside token k: its first character stays
    steps = llm.engine.num_steps
    out = llm.generate(prompt_token_ids=[prompt(9, seed=3)], sampling_params=SamplingParams(stop=[stop], **params))
    steps = llm.engine.num_steps - steps  # one per token: the stop ended the sample in the engine
    sample = out[0].outputs[0]
    cut = base.text.index(stop)
    assert sample.text == base.text[:cut] and (sample.finish_reason, sample.stop_reason) == ("stop", stop)
    ends = [len(p) for p in pieces]
    assert sample.token_ids == base.token_ids[: next(i for i, e in enumerate(ends) if e >= cut + len(stop))]
    assert steps == len(sample.token_ids) < 16
