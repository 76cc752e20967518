"""gptoss_kernels.cpu_kernels: the C kernels of a CPU decode step compute what the torch paths
compute. Experts, in bf16: the dense path's arithmetic (moe_experts_dense, the same bf16
roundings) and, within bf16 error, the float32 pairs reference; in float32: the pairs
reference, up to the order of float32 sums. Attention: the reference's per-sequence loop
(windows, recycled blocks, GQA, sinks, NaN in every slot it must not read), also through the
model's entry point (ops.paged_attention)."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import cpu_kernels
from gptoss_kernels.attention import _decode_batched, _per_sequence
from gptoss_kernels.moe import ExpertWeights, moe_experts_dense, moe_experts_ref
from gptoss_kernels.ops import paged_attention
from support.paged import random_decode_step

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None,
                                reason="the CPU kernels do not build here (no AVX512-BF16 or no C compiler)")
E, H, I, K = 8, 64, 96, 4
ALPHA, LIMIT = 1.702, 7.0


def _experts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)
    return dict(gate_up_weight=r(E, 2 * I, H, scale=0.2), gate_up_bias=r(E, 2 * I, scale=0.5),
                down_weight=r(E, H, I, scale=0.2), down_bias=r(E, H, scale=0.5))


def _route(t: int, seed: int = 1, experts: int = E):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K)
    weights = torch.softmax(torch.randn(t, K, generator=g), -1).to(torch.bfloat16)
    return ids.to(torch.int64), weights


def _dense(x, ids, weights, w):
    """moe_experts_dense with plain (unpacked) GEMMs over the same dense weights."""
    from gptoss_kernels.moe import dense_down_weight, dense_gate_up_weight

    gate_up, bias = dense_gate_up_weight(w["gate_up_weight"], w["gate_up_bias"])
    down = dense_down_weight(w["down_weight"], w["down_bias"])
    return moe_experts_dense(x, ids, weights, lambda a: torch.nn.functional.linear(a, gate_up, bias),
                             lambda a: torch.nn.functional.linear(a, down), E, ALPHA, LIMIT)


def _float32_reference(x, ids, weights, w):
    plain = ExpertWeights(**{k: v.float() for k, v in w.items()})
    t = x.shape[0]
    rows = torch.arange(t).repeat_interleave(K)
    out = moe_experts_ref(x.float()[rows], ids.reshape(-1), weights.float().reshape(-1), plain, ALPHA, LIMIT)
    return out.view(t, K, H).sum(1)


@pytest.mark.parametrize("tokens", [1, 5, 16, 70])  # 70: past the kernel's on-stack accumulator (64 rows)
def test_kernel_matches_the_dense_path_and_the_float32_reference(tokens):
    w = _experts()
    x = (torch.randn(tokens, H, generator=torch.Generator().manual_seed(2))).to(torch.bfloat16)
    ids, weights = _route(tokens, experts=E - 1)  # the last expert is chosen by nobody
    got = cpu_kernels.moe_decode(x, ids, weights, *w.values(), ALPHA, LIMIT)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, H)
    dense = _dense(x, ids, weights, w)
    # the same roundings, the float32 sums in another order: at most a bf16 ulp or so apart
    torch.testing.assert_close(got.float(), dense.float(), atol=2e-2, rtol=1.6e-2)
    want = _float32_reference(x, ids, weights, w)
    assert (got.float() - want).abs().max() <= 1.5 * (dense.float() - want).abs().max() + 1e-3


@pytest.mark.parametrize("tokens", [1, 16, 70])
def test_float32_kernel_matches_the_pairs_reference(tokens):
    w = {k: v.float() for k, v in _experts().items()}
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(2))
    ids, weights = _route(tokens, experts=E - 1)
    got = cpu_kernels.moe_decode(x, ids, weights.float(), *w.values(), ALPHA, LIMIT)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _float32_reference(x, ids, weights, w), atol=2e-5, rtol=2e-5)


def test_kernel_takes_an_empty_step_and_refuses_an_expert_out_of_range():
    w = _experts()
    ids, weights = _route(0)
    assert cpu_kernels.moe_decode(torch.zeros(0, H, dtype=torch.bfloat16), ids, weights, *w.values(),
                                   ALPHA, LIMIT).shape == (0, H)
    ids, weights = _route(3)
    ids[1, 2] = E  # one past the last local expert
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.moe_decode(torch.ones(3, H, dtype=torch.bfloat16), ids, weights, *w.values(), ALPHA, LIMIT)


def test_kernel_is_taken_only_where_it_applies(monkeypatch):
    assert cpu_kernels.moe_takes(torch.bfloat16, 2880, 2880)  # gpt-oss's sizes
    assert cpu_kernels.moe_takes(torch.float32, 2880, 2880)
    assert not cpu_kernels.moe_takes(torch.float16, 2880, 2880)
    assert not cpu_kernels.moe_takes(torch.bfloat16, 2880, 2890)  # not a multiple of 32
    monkeypatch.setenv("GPTOSS_KERNELS", "reference")
    assert not cpu_kernels.moe_takes(torch.bfloat16, 2880, 2880)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 8, 1])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_decode_attention_equals_the_per_sequence_reference(window, heads, dtype):
    q, k_cache, v_cache, tables, ctx, sinks = random_decode_step(window, heads, hash((window, heads, 1)) % 2**31,
                                                                 nan_unread_tail=True)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    want = _per_sequence(q.float(), k_cache.float(), v_cache.float(), tables, cu, ctx, sinks, 0.25, window)
    assert cpu_kernels.attention_takes(q, k_cache)
    got = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, ctx, sinks, 0.25, window)
    assert got.dtype == dtype and not torch.isnan(got).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    # the model's entry point takes it on a pure decode step
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window), got)


def test_decode_attention_skips_a_block_it_may_not_read():
    """A -1 block inside the visible span (the batched reference masks it) is skipped, never
    dereferenced."""
    q, k_cache, v_cache, tables, ctx, sinks = random_decode_step(None, (8, 2), 9, nan_unread_tail=True)
    tables[1, 2] = -1  # sequence 1 has 60 tokens: its third block is in view
    want = _decode_batched(q, k_cache, v_cache, tables, ctx, sinks, 0.25, None)
    got = cpu_kernels.paged_decode(q, k_cache, v_cache, tables, ctx, sinks, 0.25, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_attention_refuses_a_block_out_of_range():
    q, k_cache, v_cache, tables, ctx, sinks = random_decode_step(None, (8, 2), 5)
    tables[1, 0] = k_cache.shape[0]  # one past the pool
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.paged_decode(q, k_cache, v_cache, tables, ctx, sinks, 0.25, None)
