"""A random decode step over a paged KV cache, for the attention tests: 12 sequences, one
query each, contexts 1..60 (one first token, one ending on a block edge), shuffled blocks,
NaN wherever a correct kernel must not read."""

from __future__ import annotations

import torch


def random_decode_step(window: int | None, heads: tuple[int, int], seed: int, nan_unread_tail: bool = False):
    """-> (q [B, Hq, D], k_cache, v_cache [NB, BS, Hkv, D], tables [B, 15] int32, ctx [B] int32,
    sinks [Hq]). Block 0 (never handed out) is NaN and fills each row's unused tail; with a
    window, blocks wholly left of it are -1 (recycled); with nan_unread_tail, the slots past
    each context in its last block are NaN too."""
    g = torch.Generator().manual_seed(seed)
    hq, hkv = heads
    b, d, bs, nb = 12, 16, 4, 300
    k_cache, v_cache = torch.randn(nb, bs, hkv, d, generator=g), torch.randn(nb, bs, hkv, d, generator=g)
    k_cache[0], v_cache[0] = float("nan"), float("nan")
    ctx = torch.randint(1, 60, (b,), dtype=torch.int32, generator=g)
    ctx[0], ctx[1] = 1, 60
    tables = (torch.randperm(nb - 1, generator=g)[: b * 15] + 1).view(b, 15).int()
    for i in range(b):
        used = (int(ctx[i]) + bs - 1) // bs
        tables[i, used:] = 0
        if nan_unread_tail:
            last = int(tables[i, used - 1])
            k_cache[last, (int(ctx[i]) - 1) % bs + 1:] = float("nan")
            v_cache[last, (int(ctx[i]) - 1) % bs + 1:] = float("nan")
        if window:
            tables[i, : max(0, int(ctx[i]) - window) // bs] = -1
    q = torch.randn(b, hq, d, generator=g)
    sinks = 3 * torch.randn(hq, generator=g)
    return q, k_cache, v_cache, tables, ctx, sinks
