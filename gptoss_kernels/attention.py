"""Paged attention with per-head sinks and an optional sliding window, the torch reference.

Legend: T query tokens of the step (all sequences packed), B sequences, Hq / Hkv query
and kv heads, D head dim, NB blocks, BS tokens per block, MB blocks per sequence.

Sinks (gpt-oss): each head has a learned logit that joins the softmax denominator, so a
head can put probability mass "nowhere"; it contributes no value.
"""

from __future__ import annotations

import torch


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    skip_negative: bool = True,
) -> None:
    """Write k, v [T, Hkv, D] into the caches [NB, BS, Hkv, D] at flat slots [T] (-1 = skip).
    With skip_negative=False the caller promises every slot is >= 0: two index_copy_ and
    no boolean mask (whose data-dependent shape is a device sync)."""
    if not skip_negative:
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep].to(v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D]. The n_b queries of sequence b are the last n_b
    positions of its context; query position i sees key positions j <= i with
    i - j < window (when set). Blocks wholly outside the window are never read, so the
    block table may hold -1 there (recycled sliding-window blocks)."""
    n_q = cu_seqlens_q.diff()
    decodes = (n_q == 1).nonzero().flatten()  # sequences with one query: batched together
    if len(decodes) == len(n_q):
        return _decode_batched(q, k_cache, v_cache, block_tables, context_lens, sinks, sm_scale, window)
    out = _per_sequence(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks, sm_scale, window,
                        skip_decodes=len(decodes) > 1)
    if len(decodes) > 1:
        rows = cu_seqlens_q[decodes].long()
        out[rows] = _decode_batched(q[rows], k_cache, v_cache, block_tables[decodes], context_lens[decodes],
                                    sinks, sm_scale, window)
    return out


def _per_sequence(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks, sm_scale, window,
                  skip_decodes: bool = False):
    """Any mix of prefill chunks and decodes, one sequence at a time (with skip_decodes,
    sequences with a single query are left for the batched path)."""
    out = torch.empty_like(q)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    cu = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b, ctx in enumerate(lens):
        q_start, q_end = cu[b], cu[b + 1]
        n_q = q_end - q_start
        if n_q == 0 or (skip_decodes and n_q == 1):
            continue
        first_q = ctx - n_q  # position of the first query token
        k_start = 0 if window is None else max(0, first_q - window + 1)
        block_ids = block_tables[b, k_start // block_size : (ctx - 1) // block_size + 1].long()
        keys = k_cache[block_ids].flatten(0, 1)  # [n_blocks * BS, Hkv, D]
        vals = v_cache[block_ids].flatten(0, 1)
        offset = k_start - (k_start // block_size) * block_size
        # scores and softmax in float32 whatever the cache dtype, as the kernels do
        keys = keys[offset : offset + ctx - k_start].float()  # [S, Hkv, D]: positions k_start..ctx-1
        vals = vals[offset : offset + ctx - k_start].float()
        keys = keys.repeat_interleave(group, dim=1)  # [S, Hq, D]
        vals = vals.repeat_interleave(group, dim=1)
        qb = q[q_start:q_end].float()  # [n, Hq, D]
        scores = torch.einsum("nhd,shd->hns", qb, keys) * sm_scale  # [Hq, n, S]
        q_pos = torch.arange(first_q, ctx, device=q.device)[:, None]
        k_pos = torch.arange(k_start, ctx, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if window is not None:
            visible &= q_pos - k_pos < window
        scores = scores.masked_fill(~visible, float("-inf"))
        sink = sinks.float()[:, None, None].expand(-1, n_q, 1)  # [Hq, n, 1]
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        out[q_start:q_end] = torch.einsum("hns,shd->nhd", probs, vals).to(q.dtype)
    return out


def decode_reads(block_tables, context_lens, block_size: int, window: int | None):
    """What a decode step (one query per sequence, at position ctx - 1) reads: the blocks of
    each sequence that hold visible keys, and which of their slots are visible.

    -> (tables [B, MB'] int64, -1 replaced by 0; visible [B, MB' * BS] bool). Unreadable slots
    (beyond the context, outside the window, in -1 blocks) are invisible. The same for every
    layer with this window, so a step can compute it once per window."""
    b = block_tables.shape[0]
    ctx = context_lens.long()  # [B]
    num_blocks = (int(ctx.max()) + block_size - 1) // block_size
    # the query sits at position ctx - 1 and sees positions > ctx - 1 - window
    first = (ctx - window).clamp(min=0) if window is not None else torch.zeros_like(ctx)  # [B]
    cols = torch.arange(num_blocks, device=ctx.device)[None, :]  # [1, MB']: the blocks read
    if window is not None and num_blocks > (span := (window - 1) // block_size + 2):
        # a window touches at most `span` blocks: read those, not the whole context
        cols = (first // block_size).clamp(max=num_blocks - span)[:, None] + cols[:, :span]  # [B, span]
    tables = block_tables[:, :num_blocks].long().gather(1, cols.expand(b, -1))  # [B, MB']
    pos = (cols[..., None] * block_size + torch.arange(block_size, device=ctx.device)).flatten(1)  # [B or 1, S]
    visible = (pos < ctx[:, None]) & (pos >= first[:, None])  # [B, S]
    visible &= (tables >= 0).repeat_interleave(block_size, dim=1)
    return tables.clamp(min=0), visible


def _decode_batched(q, k_cache, v_cache, block_tables, context_lens, sinks, sm_scale, window):
    """One query per sequence (a decode step): all sequences at once instead of a loop,
    keys gathered up to the longest context and masked per sequence. Same semantics as
    the loop: unreadable slots (beyond the context, outside the window, -1 blocks) are
    masked out of both the scores and the values."""
    b, num_heads, d = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    tables, visible = decode_reads(block_tables, context_lens, k_cache.shape[1], window)
    keys = k_cache[tables].flatten(1, 2).float()  # [B, S, Hkv, D]
    vals = v_cache[tables].flatten(1, 2).float()
    vals = vals.masked_fill(~visible[:, :, None, None], 0.0)  # a NaN in an unread slot must not leak
    qg = q.float().view(b, num_kv_heads, group, d)  # [B, Hkv, G, D]
    scores = torch.einsum("bkgd,bskd->bkgs", qg, keys) * sm_scale  # [B, Hkv, G, S]
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    sink = sinks.float().view(1, num_kv_heads, group, 1).expand(b, -1, -1, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("bkgs,bskd->bkgd", probs, vals)  # [B, Hkv, G, D]
    return out.reshape(b, num_heads, d).to(q.dtype)
