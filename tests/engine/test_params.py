"""Sampling parameters end to end through the engine on the tiny model: each one, ignored, fails a test."""

from __future__ import annotations

import pytest
from support.engine_helpers import make_engine, prompt, run_all

from gptoss_ray.errors import SamplingParamsError
from gptoss_ray.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return make_engine(tiny_ckpt)


def greedy(engine, tokens, **kw):
    params = SamplingParams(**({"temperature": 0.0, "max_tokens": 10, "ignore_eos": True} | kw))
    engine.add_request("r", tokens, params)
    deltas = []
    while engine.has_unfinished_requests():
        deltas.extend(engine.step())
    return [t for d in deltas for t in d.token_ids], deltas[-1]


def test_max_tokens(engine):
    tokens, last = greedy(engine, prompt(6, seed=1), max_tokens=3)
    assert len(tokens) == 3 and last.finish_reason == "length"


def test_stop_token_ids_end_the_output_inclusive(engine):
    base, _ = greedy(engine, prompt(6, seed=2))
    stop = base[4]
    tokens, last = greedy(engine, prompt(6, seed=2), stop_token_ids=[stop])
    assert tokens == base[: base.index(stop) + 1]
    assert last.finish_reason == "stop" and last.stop_reason == stop


def test_min_tokens_defers_a_stop_token(engine):
    base, _ = greedy(engine, prompt(6, seed=2))
    first = base.index(base[4])
    tokens, last = greedy(engine, prompt(6, seed=2), stop_token_ids=[base[4]], min_tokens=first + 2)
    assert len(tokens) > first + 1 and base[4] not in tokens[: first + 2]


def test_engine_leaves_stop_strings_to_the_output_processor(engine):
    # Text is the output processor's (tests/engine/test_llm_api.py, tests/output/): the
    # engine streams every token at once, holding nothing back for a possible stop string.
    base, _ = greedy(engine, prompt(6, seed=3), max_tokens=12, logprobs=0)
    engine.add_request("r", prompt(6, seed=3), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                              stop=["a", "e", " "]))
    per_step = []
    while engine.has_unfinished_requests():
        per_step.append([t for d in engine.step() for t in d.token_ids])
    assert [t for step in per_step for t in step] == base
    assert all(len(step) == 1 for step in per_step[:12])


def test_engine_stops_a_sample_it_is_told_to(engine):
    params = SamplingParams(n=2, temperature=1.0, seed=0, max_tokens=20, ignore_eos=True)
    engine.add_request("r", prompt(6, seed=3), params)
    ended = {}
    while engine.has_unfinished_requests():
        for d in engine.step():
            ended.setdefault(d.index, []).append(d)
        if 1 in ended and len(ended[1]) == 2:  # sample 1 has two tokens: stop it, as a stop string would
            for d in engine.abort_request("r", 1):
                ended[1].append(d)
    assert ended[1][-1].finish_reason == "abort" and sum(len(d.token_ids) for d in ended[1]) == 2
    assert ended[0][-1].finish_reason == "length" and sum(len(d.token_ids) for d in ended[0]) == 20
    assert engine.abort_request("r", 1) == [] and not engine.seqs


def test_temperature_changes_output(engine):
    base, _ = greedy(engine, prompt(6, seed=4))
    hot, _ = greedy(engine, prompt(6, seed=4), temperature=1.0, seed=0)
    assert hot != base


def test_seed_reproduces_across_batches(tiny_ckpt, engine):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
    alone = run_all(engine, {"s": (prompt(7, seed=5), p)})
    crowd = {f"x{i}": (prompt(3 + i, seed=50 + i), SamplingParams(temperature=1.0, max_tokens=8)) for i in range(5)}
    together = run_all(make_engine(tiny_ckpt), {**crowd, "s": (prompt(7, seed=5), p)})
    assert together[("s", 0)] == alone[("s", 0)]
    other_seed = run_all(engine, {"s": (prompt(7, seed=5), SamplingParams(temperature=1.0, top_p=0.9, seed=12,
                                                                         max_tokens=8, ignore_eos=True))})
    assert other_seed[("s", 0)] != alone[("s", 0)]


def test_penalties_change_greedy_output(engine):
    # The random tiny model never repeats itself greedily; a repetition penalty below 1
    # (allowed: it rewards repeats) makes it copy prompt tokens, which presence and
    # frequency penalties on its output then push back.
    tokens = prompt(6, seed=2)
    plain, _ = greedy(engine, tokens, max_tokens=12)
    repeats, _ = greedy(engine, tokens, max_tokens=12, repetition_penalty=0.1)
    assert repeats != plain and set(repeats[:4]) <= set(tokens) | set(repeats[:3])
    presence, _ = greedy(engine, tokens, max_tokens=12, repetition_penalty=0.1, presence_penalty=2.0)
    frequency, _ = greedy(engine, tokens, max_tokens=12, repetition_penalty=0.1, frequency_penalty=2.0)
    assert presence != repeats and frequency != repeats


def test_logprobs_count_and_sampled_token(engine):
    tokens, _ = greedy(engine, prompt(6, seed=7), max_tokens=4, logprobs=5)
    engine.add_request("lp", prompt(6, seed=7), SamplingParams(temperature=0.0, max_tokens=4, logprobs=5,
                                                               ignore_eos=True))
    lps = []
    while engine.has_unfinished_requests():
        for d in engine.step():
            lps.extend(d.logprobs)
    assert len(lps) == 4
    for tok, entry in zip(tokens, lps):
        assert tok in entry and len(entry) == 5 and max(entry, key=entry.get) == tok


def test_eos_ends_the_output_unless_ignored_or_before_min_tokens(tiny_ckpt):
    engine = make_engine(tiny_ckpt)
    base, _ = greedy(engine, prompt(6, seed=2))
    engine.eos_token_ids = frozenset({base[2]})  # as if the model's EOS were the third token
    tokens, last = greedy(engine, prompt(6, seed=2), ignore_eos=False)
    assert tokens == base[:3] and (last.finish_reason, last.stop_reason) == ("stop", None)
    tokens, last = greedy(engine, prompt(6, seed=2))  # ignore_eos
    assert tokens == base and last.finish_reason == "length"
    tokens, last = greedy(engine, prompt(6, seed=2), ignore_eos=False, min_tokens=4)
    assert tokens[:3] == base[:3] and len(tokens) > 3  # cannot stop before min_tokens


@pytest.mark.parametrize("stop", [["x"] * (MAX_STOP_STRINGS + 1), ["x" * (MAX_STOP_CHARS + 1)], ["ok", ""]])
def test_stop_strings_are_bounded(stop):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(stop=stop)
    assert err.value.param == "stop" and len(str(err.value)) < 400  # a 1 MB string is not echoed back


@pytest.mark.parametrize("tokens,params,param", [
    ([], SamplingParams(), "prompt"),
    ([1, 2, 300000], SamplingParams(), "prompt"),
    (list(range(300)), SamplingParams(), "prompt"),
    (list(range(100)), SamplingParams(max_tokens=200), "max_tokens"),
])
def test_invalid_requests_name_the_param(engine, tokens, params, param):
    with pytest.raises(SamplingParamsError) as err:
        engine.add_request("bad", tokens, params)
    assert err.value.param == param
    assert not engine.has_unfinished_requests()


# --- the flags derived from SamplingParams, in one place ------------------------------------

# One non-default value per sampler field: each must take the row off the sampler's fast path.
OFF_DEFAULT = {"top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
               "repetition_penalty": 1.2, "seed": 1, "min_tokens": 1, "logprobs": 0, "logit_bias": {3: 1.0},
               "grammar": 'start: "a"'}


def test_every_field_is_classified_for_the_fast_paths():
    from dataclasses import fields

    from gptoss_ray.sampling_params import OTHER_FIELDS, SAMPLER_FIELDS

    names = [f.name for f in fields(SamplingParams)]
    assert sorted(names) == sorted(SAMPLER_FIELDS + OTHER_FIELDS)
    assert set(OFF_DEFAULT) == set(SAMPLER_FIELDS)


@pytest.mark.parametrize("name", sorted(OFF_DEFAULT))
def test_any_sampler_field_leaves_the_sampler_fast_path(name):
    assert SamplingParams().plain_sampling
    assert not SamplingParams(**{name: OFF_DEFAULT[name]}).plain_sampling


def test_output_fast_path_and_greedy_flags():
    assert SamplingParams().plain_output and SamplingParams(n=3, max_tokens=5).plain_output
    for kw in ({"logprobs": 0}, {"prompt_logprobs": 0}):
        assert not SamplingParams(**kw).plain_output, kw
    assert SamplingParams(temperature=0.0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=0.5).greedy
    assert SamplingParams(repetition_penalty=1.1).has_penalty and not SamplingParams(min_p=0.2).has_penalty
