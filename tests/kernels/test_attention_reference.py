"""The attention reference's batched decode path equals its per-sequence path (the
semantics the Triton kernel is checked against): windows, recycled (-1) blocks, GQA,
sinks, and NaN in every slot that must not be read."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels.attention import _decode_batched, _per_sequence, paged_attention_ref
from support.paged import random_decode_step


@pytest.mark.parametrize("window", [None, 8, 1])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)])
def test_batched_decode_equals_per_sequence(window, heads):
    q, k_cache, v_cache, tables, ctx, sinks = random_decode_step(window, heads, hash((window, heads)) % 2**31)
    b = q.shape[0]
    cu = torch.arange(b + 1, dtype=torch.int32)
    batched = _decode_batched(q, k_cache, v_cache, tables, ctx, sinks, 0.25, window)
    looped = _per_sequence(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window)
    assert not torch.isnan(batched).any()
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    # the public entry point takes the batched path for pure decode steps
    torch.testing.assert_close(paged_attention_ref(q, k_cache, v_cache, tables, cu, ctx, sinks, 0.25, window), batched)


def test_unmasked_kv_write_writes_exactly_the_given_slots():
    """store_kv(skip_negative=False), the pure-decode write: the given slots get k and v,
    every other slot keeps its NaN; the masked write agrees where no slot is -1."""
    from gptoss_kernels.attention import store_kv

    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    slots = torch.tensor([9, 2, 14])
    caches = [torch.full((4, 4, 2, 4), float("nan")) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], slots, skip_negative=False)
    store_kv(k, v, caches[2], caches[3], slots)
    for got, want in zip(caches[:2], caches[2:]):
        torch.testing.assert_close(got, want, equal_nan=True)
    flat_k = caches[0].view(-1, 2, 4)
    torch.testing.assert_close(flat_k[slots], k)
    others = torch.ones(16, dtype=torch.bool)
    others[slots] = False
    assert flat_k[others].isnan().all()
