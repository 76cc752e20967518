"""The CPU decode attention (torch's flash kernel plus sinks on its log-sum-exp) equals the
reference's per-sequence loop: windows, recycled (-1) blocks, GQA, sinks, NaN in every slot
that must not be read, float32 and bfloat16, and one step's memo shared by its layers."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels.attention import _per_sequence
from gptoss_kernels.attention_cpu import paged_decode_cpu
from gptoss_kernels.ops import paged_attention


def _step(window, heads, seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    b, d, bs, nb = 12, 16, 4, 300
    k_cache, v_cache = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    k_cache[0], v_cache[0] = float("nan"), float("nan")  # block 0 is never handed out
    ctx = torch.randint(1, 60, (b,), dtype=torch.int32, generator=g)
    ctx[0], ctx[1] = 1, 60  # a first token, and a context ending on a block edge
    tables = (torch.randperm(nb - 1, generator=g)[: b * 15] + 1).view(b, 15).int()
    for i in range(b):  # poison the unused tail of each row, NaN the unread slots of its last block
        used = (int(ctx[i]) + bs - 1) // bs
        tables[i, used:] = 0
        last = int(tables[i, used - 1])
        k_cache[last, (int(ctx[i]) - 1) % bs + 1:] = float("nan")
        v_cache[last, (int(ctx[i]) - 1) % bs + 1:] = float("nan")
        if window:  # blocks left of the window recycled
            tables[i, : max(0, int(ctx[i]) - window) // bs] = -1
    q = torch.randn(b, hq, d, generator=g)
    sinks = 3 * torch.randn(hq, generator=g)
    return q, k_cache, v_cache, tables, ctx, sinks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 8, 1])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_cpu_decode_equals_the_per_sequence_reference(window, heads, dtype):
    q, k_cache, v_cache, tables, ctx, sinks = _step(window, heads, hash((window, heads)) % 2**31)
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    want = _per_sequence(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window)  # float32
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    got = paged_decode_cpu(q, k_cache, v_cache, tables, ctx, sinks.to(dtype), 0.25, window)
    assert got.dtype == dtype and not torch.isnan(got).any()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    if dtype == torch.bfloat16:  # against the reference on the same bf16 inputs
        want = _per_sequence(q.float(), k_cache.float(), v_cache.float(), tables, cu, ctx, sinks.to(dtype).float(),
                             0.25, window)
    torch.testing.assert_close(got.float(), want, **tol)
    # the model's entry point takes this path on a pure decode step, and a step's memo serves every layer
    memo = {}
    for _ in range(2):
        torch.testing.assert_close(paged_attention(q, k_cache, v_cache, tables, cu, ctx, sinks.to(dtype), 0.25, window,
                                                   schedules=memo), got)
    assert len(memo) == 1


def test_memo_is_per_window():
    """Sliding and full layers of one step read different slots: each window gets its own reads."""
    q, k_cache, v_cache, tables, ctx, sinks = _step(None, (8, 2), 7)
    tables[tables < 0] = 0
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32)
    memo = {}
    for window in (None, 8, None, 8):
        got = paged_attention(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window, schedules=memo)
        torch.testing.assert_close(got, _per_sequence(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window),
                                   atol=1e-5, rtol=1e-5)
    assert len(memo) == 2
