"""The sampler on hand-built logits: each parameter changes what is sampled, as documented."""

from __future__ import annotations

import math

import pytest
import torch

from gptoss_ray.engine.sampler import Sampler, SamplingMetadata, TokenHistory
from gptoss_ray.engine.worker import SeqState
from gptoss_ray.errors import SamplingParamsError
from gptoss_ray.sampling_params import SamplingParams

V = 8
EOS = 7


def state(params: SamplingParams, prompt=(1, 2), output=(), index=0) -> SeqState:
    return SeqState(token_ids=[*prompt, *output], num_prompt_tokens=len(prompt), num_computed_tokens=0,
                    params=params, sample_index=index, row=0)


def sample(states, logits, seed=0, method=None):
    history = TokenHistory(len(states), 64, V, "cpu")  # as the worker keeps it
    for row, s in enumerate(states):
        s.row = row
        history.set_row(row, s.token_ids)
    meta = SamplingMetadata.build(states, V, [EOS], "cpu", history)
    return Sampler("cpu", seed=seed, method=method)(logits.clone(), meta)


def draws(params, probs, rows=2000, seed=0, method=None) -> torch.Tensor:
    """Token counts over `rows` independent rows with the same logits."""
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(rows, V)
    out = sample([state(params) for _ in range(rows)], logits, seed=seed, method=method)
    return torch.bincount(torch.tensor(out.token_ids), minlength=V)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


PROBS = [0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]


def test_greedy_is_argmax():
    logits = torch.randn(5, V)
    out = sample([state(SamplingParams(temperature=0.0)) for _ in range(5)], logits)
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
def test_sampling_follows_the_distribution_and_temperature_flattens_it(method):
    counts = draws(SamplingParams(temperature=1.0), PROBS, method=method).float() / 2000
    assert torch.allclose(counts, torch.tensor(PROBS), atol=0.04)
    hot = draws(SamplingParams(temperature=5.0), PROBS, method=method)
    assert hot[0] < 0.25 * 2000 and hot[7] > 0.03 * 2000  # much flatter than PROBS


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
def test_top_k_keeps_only_the_k_most_likely(method):
    counts = draws(SamplingParams(top_k=2), PROBS, method=method)
    assert counts[2:].sum() == 0 and counts[0] > 0 and counts[1] > 0


def test_top_p_keeps_the_smallest_set_over_p():
    counts = draws(SamplingParams(top_p=0.6), PROBS)  # 0.4 + 0.25 >= 0.6
    assert counts[2:].sum() == 0 and counts[1] > 0


def test_top_k_and_top_p_together():
    counts = draws(SamplingParams(top_k=3, top_p=0.95), PROBS)
    assert counts[3:].sum() == 0 and counts[2] > 0


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
def test_min_p_drops_tokens_below_a_fraction_of_the_best(method):
    counts = draws(SamplingParams(min_p=0.3), PROBS, method=method)  # keep p >= 0.12: tokens 0, 1, 2
    assert counts[3:].sum() == 0 and counts[2] > 0


def test_mixed_batch_applies_each_rows_own_params():
    logits = torch.log(torch.tensor(PROBS)).expand(600, V)
    params = [SamplingParams(top_k=1), SamplingParams(temperature=0.0), SamplingParams(top_p=0.6)] * 200
    tokens = torch.tensor(sample([state(p) for p in params], logits).token_ids).view(200, 3)
    assert (tokens[:, 0] == 0).all() and (tokens[:, 1] == 0).all()
    assert set(tokens[:, 2].tolist()) == {0, 1}


def test_presence_and_frequency_penalties_act_on_output_tokens():
    logits = torch.tensor([[3.0, 2.5, 0, 0, 0, 0, 0, 0]])
    greedy = dict(temperature=0.0)
    assert sample([state(SamplingParams(**greedy), output=(0,))], logits).token_ids == [0]
    assert sample([state(SamplingParams(presence_penalty=1.0, **greedy), output=(0,))], logits).token_ids == [1]
    # frequency: two occurrences of 0 cost 2 x 0.3 = 0.6 > 0.5
    assert sample([state(SamplingParams(frequency_penalty=0.3, **greedy), output=(0,))], logits).token_ids == [0]
    assert sample([state(SamplingParams(frequency_penalty=0.3, **greedy), output=(0, 0))], logits).token_ids == [1]
    # prompt tokens do not count for presence / frequency
    assert sample([state(SamplingParams(presence_penalty=2.0, **greedy), prompt=(0,))], logits).token_ids == [0]


def test_repetition_penalty_covers_prompt_and_output():
    logits = torch.tensor([[3.0, 2.5, 0, 0, 0, 0, 0, 0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5)  # 3.0 / 1.5 = 2.0 < 2.5
    assert sample([state(p, prompt=(5,))], logits).token_ids == [0]
    assert sample([state(p, prompt=(0,))], logits).token_ids == [1]
    assert sample([state(p, prompt=(5,), output=(0,))], logits).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0, 0, 0, 0, 0, 4.0, 0, 5.0]])  # EOS (7) best, then 5
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5])
    assert sample([state(p, output=(1,))], logits).token_ids == [0]  # 7 and 5 banned
    assert sample([state(p, output=(1, 1))], logits).token_ids == [7]
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sample([state(ignore, output=(1,))], logits).token_ids == [7]  # EOS does not stop: not banned


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
def test_seeded_rows_are_independent_of_the_batch(method):
    p = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(1, V)

    def run(batch_rows, row, seed):
        rows = [state(SamplingParams(temperature=1.0)) for _ in range(batch_rows)]
        rows[row] = state(p, output=(3,) * 4)
        batch_logits = torch.randn(batch_rows, V)
        batch_logits[row] = logits[0]
        return sample(rows, batch_logits, seed=seed, method=method).token_ids[row]

    tokens = {run(n, row, seed) for n, row, seed in [(1, 0, 0), (7, 3, 1), (16, 15, 2), (3, 1, 3)]}
    assert len(tokens) == 1
    # ... and the seed matters: over 8 seeds, tokens differ
    flat = torch.zeros(1, V)
    assert len({sample([state(SamplingParams(seed=s))], flat, method=method).token_ids[0] for s in range(8)}) > 1


def test_logprobs_are_the_raw_distribution_with_the_sampled_token():
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=5.0)]
    out = sample([state(p, prompt=(int(logits[2].argmax()),)) for p in params], logits)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[1] is None
    top = out.logprobs[0]
    assert list(top) == ref[0].topk(3).indices.tolist()
    assert all(math.isclose(v, float(ref[0, k]), abs_tol=1e-5) for k, v in top.items())
    # row 2's penalty changed the choice; its logprob is still the model's
    (token, lp), = out.logprobs[2].items()
    assert token == out.token_ids[2] != int(logits[2].argmax())
    assert math.isclose(lp, float(ref[2, token]), abs_tol=1e-5)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("temperature", -1.0), ("top_p", 0.0), ("top_k", 0), ("min_p", 1.5), ("presence_penalty", 3.0),
    ("frequency_penalty", -3.0), ("repetition_penalty", 0.0), ("max_tokens", 0), ("min_tokens", -1),
    ("logprobs", 21), ("stop", [""]), ("stop_token_ids", [-1]),
    # the extremes a client can send: none may reach a tensor (a 10^20 top_k once overflowed it)
    ("top_k", 10**20), ("top_k", 2**63), ("n", 10**20), ("max_tokens", 2**63), ("min_tokens", 10**20),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", float("nan")), ("min_p", float("inf")), ("presence_penalty", float("nan")),
    ("repetition_penalty", float("inf")), ("logprobs", 2**63), ("stop_token_ids", [2**63]),
    ("logit_bias", {1: 101.0}), ("logit_bias", {1: float("nan")}), ("logit_bias", {2**63: 1.0}),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {i: 1.0 for i in range(2000)}), ("max_tokens", True),
])
def test_invalid_params_name_the_param(field, value):
    with pytest.raises(SamplingParamsError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field and field in str(err.value)


@pytest.mark.parametrize("scale", [0.5, 8.0])  # flat (sort fallback) and peaked (candidate path)
def test_top_k_top_p_candidates_equal_the_full_sort(scale, monkeypatch):
    from gptoss_ray.engine import sampler

    monkeypatch.setattr(sampler, "TOP_CANDIDATE_STAGES", (16, 64))  # both stages, then the sort
    vocab = 3000
    logits = torch.randn(12, vocab) * scale
    top_k = torch.tensor([vocab, 5, 64, 65, 2000, vocab, 16, 17] + [vocab] * 4)
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.3, 1.0, 0.99, 0.2, 1.0, 0.7, 0.8, 0.6])
    fast = sampler._apply_top_k_top_p(logits, top_k, top_p)
    slow = sampler._sort_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(fast.isinf(), slow.isinf())
    assert torch.equal(fast[~fast.isinf()], logits[~fast.isinf()])
    only_k = sampler._apply_top_k_top_p(logits, top_k, None)
    assert torch.equal(only_k.isinf(), sampler._sort_top_k_top_p(logits, top_k, torch.ones(12)).isinf())
    # k beyond the candidates (65, 2000) is a selection: with many ties at the k-th value it keeps them all, as the sort
    tied, big = (logits * 2).round(), (top_k > 64) & (top_k < vocab)
    assert torch.equal(sampler._apply_top_k_top_p(tied, top_k, None)[big].isinf(),
                       sampler._sort_top_k_top_p(tied[big], top_k[big], torch.ones(int(big.sum()))).isinf())


@pytest.mark.parametrize("vocab", [201088, 8192, 6000, 1571, 50])  # blocked (several widths) and fallback
def test_argmax_rows_equals_torch_argmax_with_ties_and_infinities(vocab):
    from gptoss_ray.engine.sampler import argmax_rows

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(9, vocab, generator=g)
    x[1] = 0.0  # all tied: the first index
    x[2, vocab // 3], x[2, vocab - 1] = 50.0, 50.0  # tie across blocks: the first
    x[3] = float("-inf")
    x[4, -1] = float("inf")
    x[5, :] = -1.0
    x[5, vocab // 2 :: 7] = 3.0  # many ties inside and across blocks
    x[6] = x[6].round()  # many ties among small integers
    expected = x.argmax(dim=-1)
    assert argmax_rows(x).tolist() == expected.tolist()
    assert argmax_rows(x[:0]).shape == (0,)
    assert argmax_rows(x[7:8] * 1).tolist() == expected[7:8].tolist()


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    from gptoss_ray.sampling_params import MAX_TOP_K

    counts = draws(SamplingParams(temperature=1.0, top_k=MAX_TOP_K), PROBS, rows=500)
    assert int(counts.sum()) == 500 and int((counts > 0).sum()) >= 6  # no overflow, nothing cut


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
def test_logit_bias_forces_and_bans_tokens_and_logprobs_stay_raw(method):
    forced = draws(SamplingParams(temperature=1.0, logit_bias={6: 100.0}), PROBS, rows=300, method=method)
    assert int(forced[6]) == 300
    banned = draws(SamplingParams(temperature=1.0, logit_bias={0: -100.0, 1: -100.0}), PROBS, rows=1000,
                   method=method)
    assert int(banned[0]) == int(banned[1]) == 0 and int(banned.sum()) == 1000
    logits = torch.log(torch.tensor(PROBS)).expand(2, V)
    out = sample([state(SamplingParams(temperature=0.0, logit_bias={3: 50.0}, logprobs=1)),
                  state(SamplingParams(temperature=0.0))], logits)
    assert out.token_ids == [3, 0]  # the bias is the row's own
    assert math.isclose(out.logprobs[0][3], math.log(PROBS[3]), abs_tol=1e-5)  # the model's, not the biased


@pytest.mark.parametrize("method", ["exponential", "inverse_cdf"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_frequencies_match_softmax_of_logits_over_temperature(method, temperature):
    """Pearson's chi-square of 40,000 seeded draws against softmax(logits / T), T != 1:
    applying the temperature twice (or not at all) moves the frequencies by several points,
    a statistic in the thousands; the right distribution stays under the 0.1% critical
    value of chi-square with 7 degrees of freedom (24.32). Seeded: the same draws every run."""
    rows = 40_000
    logits = torch.log(torch.tensor(PROBS, dtype=torch.float64))
    expected = torch.softmax(logits / temperature, dim=-1) * rows
    counts = draws(SamplingParams(temperature=temperature), PROBS, rows=rows, seed=1234, method=method).double()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.32, (chi2, counts.tolist(), expected.tolist())


def test_bf16_logits_give_float32_results():
    """The worker hands the sampler logits in the model's dtype: an all-greedy batch takes their
    argmax as they are (exact), and anything else (here logprobs, a penalty, min_tokens'
    ban) is computed in float32, not in bfloat16 arithmetic."""
    logits = (torch.randn(4, V) * 3).bfloat16()
    exact = logits.float()
    greedy = sample([state(SamplingParams(temperature=0.0, min_tokens=(i == 1) * 5)) for i in range(4)], logits)
    want = exact.clone()
    want[1, EOS] = float("-inf")
    assert greedy.token_ids == want.argmax(-1).tolist()
    out = sample([state(SamplingParams(temperature=0.0, logprobs=2 * (i == 0))) for i in range(4)], logits)
    ref = torch.log_softmax(exact, -1)
    assert len(out.logprobs[0]) >= 2
    for token, lp in out.logprobs[0].items():
        assert lp == pytest.approx(float(ref[0, token]), abs=1e-6)  # bf16's log_softmax is off by ~1e-2
    assert out.token_ids == exact.argmax(-1).tolist()
