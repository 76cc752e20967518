"""The torch reference MoE's two CPU paths: the loop over experts and the grouped matmul
it switches to when experts are plain and pairs per expert are few (decode steps)."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import moe
from gptoss_kernels.moe import ExpertWeights, moe_experts_ref


def plain_experts(num_experts, hidden, inter, dtype, gen) -> ExpertWeights:
    return ExpertWeights(
        gate_up_bias=(torch.randn(num_experts, 2 * inter, generator=gen) * 0.5).to(dtype),
        down_bias=(torch.randn(num_experts, hidden, generator=gen) * 0.5).to(dtype),
        gate_up_weight=(torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2).to(dtype),
        down_weight=(torch.randn(num_experts, hidden, inter, generator=gen) * 0.2).to(dtype),
    )


def per_pair(x, ids, weights, w: ExpertWeights, alpha=1.702, limit=7.0) -> torch.Tensor:
    """Each pair on its own, straight from the definition, in float64."""
    rows = []
    for n in range(x.shape[0]):
        e = int(ids[n])
        h = w.gate_up_weight[e].double() @ x[n].double() + w.gate_up_bias[e].double()
        gate, up = h[0::2].clamp(max=limit), h[1::2].clamp(min=-limit, max=limit)
        act = (up + 1) * gate * torch.sigmoid(alpha * gate)
        rows.append(weights[n].double() * (w.down_weight[e].double() @ act + w.down_bias[e].double()))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_equals_the_loop_and_the_definition(dtype, monkeypatch):
    """40 pairs over 6 experts (expert 3 gets none, one expert gets one pair): few per
    expert, so the grouped path runs; forcing the loop gives the same rows."""
    gen = torch.Generator().manual_seed(0)
    w = plain_experts(6, 64, 32, dtype, gen)
    ids = torch.randint(0, 6, (40,), generator=gen)
    ids[ids == 3] = 2
    ids[0] = 5
    ids[ids == 5] = 1
    ids[0] = 5  # expert 5: exactly one pair
    x = torch.randn(40, 64, generator=gen).to(dtype)
    weights = torch.rand(40, generator=gen).to(dtype)

    calls = []
    real = moe._moe_experts_grouped
    monkeypatch.setattr(moe, "_moe_experts_grouped", lambda *a: calls.append(1) or real(*a))
    grouped = moe_experts_ref(x, ids, weights, w)
    assert calls, "few pairs per expert with plain weights should take the grouped path"
    monkeypatch.setattr(moe, "GROUPED_MAX_ROWS_PER_EXPERT", 0)
    looped = moe_experts_ref(x, ids, weights, w)
    assert len(calls) == 1

    exact = per_pair(x, ids, weights, w)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale = exact.abs().max().item()
    torch.testing.assert_close(grouped.double(), exact, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(looped.double(), exact, rtol=tol, atol=tol * scale)
    if dtype == torch.float32:
        torch.testing.assert_close(grouped, looped, rtol=1e-6, atol=1e-6 * scale)


def test_many_pairs_per_expert_keep_the_loop(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    w = plain_experts(2, 32, 32, torch.float32, gen)
    n = 2 * moe.GROUPED_MAX_ROWS_PER_EXPERT + 1
    monkeypatch.setattr(moe, "_moe_experts_grouped", lambda *a: pytest.fail("grouped path taken"))
    x, ids = torch.randn(n, 32, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    out = moe_experts_ref(x, ids, torch.ones(n), w)
    torch.testing.assert_close(out.double(), per_pair(x, ids, torch.ones(n), w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows_per_expert_cap", [32, 0], ids=["grouped", "loop"])
def test_bf16_activations_with_float32_experts_round_only_the_output(rows_per_expert_cap, monkeypatch):
    """Experts unpacked to float32 under a bf16 model (the CPU default) compute in float32:
    the output is the exact result rounded once to bf16."""
    monkeypatch.setattr(moe, "GROUPED_MAX_ROWS_PER_EXPERT", rows_per_expert_cap)
    gen = torch.Generator().manual_seed(2)
    w = plain_experts(4, 64, 32, torch.float32, gen)
    x = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    ids, weights = torch.randint(0, 4, (24,), generator=gen), torch.rand(24, generator=gen)
    out = moe_experts_ref(x, ids, weights.to(torch.bfloat16), w)
    assert out.dtype == torch.bfloat16
    exact = per_pair(x, ids, weights.to(torch.bfloat16), w)
    torch.testing.assert_close(out, exact.to(torch.bfloat16), rtol=8e-3, atol=1e-5)


def _per_token(x, topk_ids, topk_weights, w: ExpertWeights) -> torch.Tensor:
    """Each token's K pairs from the definition, summed (float64)."""
    t, k = topk_ids.shape
    pairs = per_pair(x.repeat_interleave(k, 0), topk_ids.reshape(-1), topk_weights.reshape(-1), w)
    return pairs.view(t, k, -1).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_path_equals_the_definition(dtype):
    """Every token through every expert, unchosen ones weighted 0: the same sums as the K
    chosen pairs (12 tokens, top-3 of 8 experts; expert 5 chosen by nobody)."""
    gen = torch.Generator().manual_seed(1)
    w = plain_experts(8, 64, 32, dtype, gen)
    x = torch.randn(12, 64, generator=gen).to(dtype)
    scores = torch.randn(12, 8, generator=gen)
    scores[:, 5] = -1e9
    topk_ids = scores.topk(3, dim=-1).indices
    topk_weights = torch.softmax(torch.randn(12, 3, generator=gen), -1)
    flat_w, flat_b = moe.dense_gate_up_weight(w.gate_up_weight, w.gate_up_bias)
    down = moe.dense_down_weight(w.down_weight, w.down_bias)
    got = moe.moe_experts_dense(x, topk_ids, topk_weights, lambda a: torch.nn.functional.linear(a, flat_w, flat_b),
                                lambda a: torch.nn.functional.linear(a, down), 8)
    want = _per_token(x, topk_ids, topk_weights, w)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got.double(), want, **tol)


def test_packed_bf16_linear_is_the_same_linear():
    """oneDNN's pre-packed weight computes what F.linear does, bit for bit here."""
    from gptoss_kernels import onednn

    if not onednn.bf16_packing_available():
        pytest.skip("this CPU has no oneDNN bf16 support")
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    bias = torch.randn(300, generator=gen).to(torch.bfloat16)
    packed = onednn.pack_weight(weight)
    for rows in (1, 5, 64):
        x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
        want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        torch.testing.assert_close(onednn.packed_linear(x, packed, bias).float(), want, rtol=2e-2, atol=2e-2)
