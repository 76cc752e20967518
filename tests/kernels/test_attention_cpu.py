"""The CPU decode attention's torch path (torch's flash kernel plus sinks on its log-sum-exp,
taken where the C kernel of cpu_kernels cannot build) equals the reference's per-sequence
loop: windows, recycled (-1) blocks, GQA, sinks, NaN in every slot that must not be read,
float32 and bfloat16, and one step's memo shared by its layers."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import cpu_kernels
from gptoss_kernels.attention import _per_sequence
from gptoss_kernels.attention_cpu import paged_decode_cpu
from gptoss_kernels.ops import paged_attention
from support.paged import random_decode_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 8, 1])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_cpu_decode_equals_the_per_sequence_reference(window, heads, dtype, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "attention_takes", lambda *a: False)  # the model's entry point below
    q, k_cache, v_cache, tables, ctx, sinks = random_decode_step(window, heads, hash((window, heads)) % 2**31,
                                                                 nan_unread_tail=True)
    q, k_cache, v_cache, sinks = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), sinks.to(dtype)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    # the reference in float32 on the same (for bf16: rounded) inputs
    want = _per_sequence(q.float(), k_cache.float(), v_cache.float(), tables, cu, ctx, sinks.float(), 0.25, window)
    got = paged_decode_cpu(q, k_cache, v_cache, tables, ctx, sinks, 0.25, window)
    assert got.dtype == dtype and not torch.isnan(got).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    # the model's entry point takes this path on a pure decode step, and a step's memo serves every layer
    memo = {}
    for _ in range(2):
        torch.testing.assert_close(paged_attention(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window,
                                                   schedules=memo), got)
    assert len(memo) == 1


def test_memo_is_per_window(monkeypatch):
    """Sliding and full layers of one step read different slots: each window gets its own reads."""
    monkeypatch.setattr(cpu_kernels, "attention_takes", lambda *a: False)
    q, k_cache, v_cache, tables, ctx, sinks = random_decode_step(None, (8, 2), 7, nan_unread_tail=True)
    tables[tables < 0] = 0
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    memo = {}
    for window in (None, 8, None, 8):
        got = paged_attention(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window, schedules=memo)
        torch.testing.assert_close(got, _per_sequence(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window),
                                   atol=1e-5, rtol=1e-5)
    assert len(memo) == 2
