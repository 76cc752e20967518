"""Triton paged attention with per-head sinks, sliding window and GQA, for prefill and decode.

Legend: T query tokens (all sequences packed), B sequences, Hq / Hkv query / kv heads,
G = Hq / Hkv query heads per kv head, D head dim, BS tokens per cache block, MB blocks per
sequence, BQ query tokens per tile, BM = BQ * G rows per tile, BN keys per step.

Same contract as `attention.paged_attention_ref`. One program handles BQ consecutive query
tokens of one sequence and all G query heads of one kv head, so each K/V tile is read once
for the whole GQA group (decode: one token x G heads fills the rows that a token-only tile
would leave empty). Keys are gathered through the block table one key at a time, so any
block size works; keys outside [lo, hi) -- before the tile's oldest window or after its
newest query -- are never loaded, which is what makes -1 entries of recycled
sliding-window blocks safe.

Softmax: online (flash) softmax in base 2 whose running max and denominator start at the
head's sink logit (m = sink, l = exp(sink - m) = 1): the sink joins the denominator and adds
no value, exactly as the reference's extra softmax column.

Flash-decoding: when (tiles x kv heads) cannot fill the GPU (a few long sequences decoding),
each tile's key range is split over a third grid axis; the splits write partial (max,
denominator, weighted sum) and `_combine_splits_kernel` merges them and adds the sink.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .routing import check_launchable, interpreting, tile_schedule

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr, sinks_ptr,
    tile_seq_ptr, tile_start_ptr, tile_end_ptr, m_split_ptr, l_split_ptr, acc_split_ptr,
    qk_scale, window, D, num_tokens, num_q_heads,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, BQ: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Grid (tile, kv head, split). Without SPLIT: the whole key range, sink included, output
    written. With SPLIT: one 1/num_splits slice of the keys; (max, denominator, weighted sum)
    go to the split buffers and _combine_splits_kernel finishes (flash-decoding)."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    row_start = tl.load(tile_start_ptr + tile)  # first query token (packed index) of the tile
    seq_end = tl.load(tile_end_ptr + tile)  # one past the sequence's last query token
    if row_start >= seq_end:  # padding tile of the sync-free schedule
        return
    seq = tl.load(tile_seq_ptr + tile).to(tl.int64)
    ctx = tl.load(context_lens_ptr + seq)
    tile_end = tl.minimum(row_start + BQ, seq_end)

    r = tl.arange(0, BQ * G_PAD)  # [BM] row = (token, head in group)
    token = row_start + r // G_PAD
    head = kv_head * G + r % G_PAD
    row_valid = (token < tile_end) & (r % G_PAD < G)
    pos = ctx - seq_end + token  # [BM] query positions: the last n_b positions of the context
    d = tl.arange(0, BD)
    d_mask = d < D
    q = tl.load(
        q_ptr + token.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None] & d_mask[None, :], other=0.0,
    )

    hi = ctx - seq_end + tile_end  # one past the newest query's position
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - seq_end + row_start - window + 1, 0)  # oldest key the oldest query sees
    k_begin = lo - lo % BN
    k_end = hi
    if SPLIT:
        chunk = tl.cdiv(tl.cdiv(hi - k_begin, tl.num_programs(2)), BN) * BN  # whole key tiles per split
        k_begin += tl.program_id(2) * chunk
        k_end = tl.minimum(hi, k_begin + chunk)
        m = tl.full((BQ * G_PAD,), -1e30, dtype=tl.float32)  # finite: an empty split must not make NaN
        denom = tl.zeros((BQ * G_PAD,), dtype=tl.float32)
    else:
        # The sink starts the running max and adds exp(sink - m) = 1 to the denominator.
        m = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        denom = tl.full((BQ * G_PAD,), 1.0, dtype=tl.float32)
    acc = tl.zeros((BQ * G_PAD, BD), dtype=tl.float32)
    block_row = block_tables_ptr + seq * stride_bt
    for start in range(k_begin, k_end, BN):
        j = start + tl.arange(0, BN)  # [BN] key positions
        key_valid = (j >= lo) & (j < hi)
        block = tl.load(block_row + j // BS, mask=key_valid, other=-1)
        key_valid &= block >= 0
        block = block.to(tl.int64)
        k_off = block * stride_kb + (j % BS) * stride_ks + kv_head * stride_kh  # [BN]
        k = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=key_valid[None, :] & d_mask[:, None], other=0.0)
        scores = tl.zeros((BQ * G_PAD, BN), dtype=tl.float32)
        scores = _dot(q, k, scores, PREC, DOT_F32) * qk_scale  # [BM, BN] log2 domain
        visible = key_valid[None, :] & (j[None, :] <= pos[:, None])
        if HAS_WINDOW:
            visible &= pos[:, None] - j[None, :] < window
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        rescale = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        denom = denom * rescale + tl.sum(p, axis=1)
        v_off = block * stride_vb + (j % BS) * stride_vs + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=key_valid[:, None] & d_mask[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * rescale[:, None], PREC, DOT_F32)
        m = m_new

    mask = row_valid[:, None] & d_mask[None, :]
    if SPLIT:
        row = (tl.program_id(2) * num_tokens + token.to(tl.int64)) * num_q_heads + head  # [BM] in [S, T, Hq]
        tl.store(m_split_ptr + row, m, mask=row_valid)
        tl.store(l_split_ptr + row, denom, mask=row_valid)
        tl.store(acc_split_ptr + row[:, None] * D + d[None, :], acc, mask=mask)
    else:
        out_ptrs = out_ptr + token.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptrs, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_splits_kernel(
    m_split_ptr, l_split_ptr, acc_split_ptr, sinks_ptr, out_ptr,
    num_splits, num_tokens, num_q_heads, D, stride_ot, stride_oh,
    BSPLIT: tl.constexpr, BD: tl.constexpr,
):
    """Grid (token, query head): merge the splits' partial softmaxes and add the sink."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    s = tl.arange(0, BSPLIT)
    s_mask = s < num_splits
    row = (s * num_tokens + token) * num_q_heads + head  # [BSPLIT]
    m = tl.load(m_split_ptr + row, mask=s_mask, other=-1e30)
    denom = tl.load(l_split_ptr + row, mask=s_mask, other=0.0)
    d = tl.arange(0, BD)
    acc = tl.load(acc_split_ptr + row[:, None] * D + d[None, :], mask=s_mask[:, None] & (d < D)[None, :], other=0.0)
    sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
    m_all = tl.maximum(tl.max(m, axis=0), sink)
    weight = tl.exp2(m - m_all)  # [BSPLIT]
    total = tl.exp2(sink - m_all) + tl.sum(denom * weight, axis=0)
    out = tl.sum(acc * weight[:, None], axis=0) / total  # [BD]
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b; DOT_F32 works around the interpreter's wrong bf16 dot (see moe_triton)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


def _tile_shape(num_tokens: int, num_seqs: int, group_pad: int) -> tuple[int, int]:
    """(BQ, BN). Rows per tile BM = BQ * G_PAD: 16 when every sequence decodes one token
    (anything more is padding), 64 for prefill. tl.dot needs every dimension >= 16."""
    rows = 16 if num_tokens <= num_seqs else 64
    return max(1, rows // group_pad), 64


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(q: torch.Tensor, num_tiles: int, num_kv_heads: int) -> int:
    """Split the keys when (tiles x kv heads) cannot fill the GPU: decoding a few long
    sequences would otherwise run on a handful of SMs. Targets ~2 programs per SM."""
    if not q.is_cuda:
        return 1
    sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device())
    programs = num_tiles * num_kv_heads
    return 1 if programs >= sms else min(_MAX_SPLITS, triton.cdiv(2 * sms, programs))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    sinks: torch.Tensor,
    sm_scale: float,
    window: int | None = None,
    num_splits: int | None = None,
    schedules: dict | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], caches [NB, BS, Hkv, D], block_tables [B, MB], cu_seqlens_q [B+1],
    context_lens [B], sinks [Hq] -> [T, Hq, D] (q.dtype); see paged_attention_ref.
    num_splits: key-range splits per tile (None = chosen from the GPU's size; 1 on CPU).
    schedules: a dict kept for one step (AttentionMetadata.schedules): the tile schedule
    depends only on cu_seqlens_q, so every layer after the first reuses it (~15 fewer ops
    per layer)."""
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if q.stride(-1) != 1:  # the kernels add d without a stride
        q = q.contiguous()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "kv cache head dim must be contiguous"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    check_launchable(q)
    num_seqs = context_lens.shape[0]
    group_pad = triton.next_power_of_2(group)
    block_q, block_n = _tile_shape(num_tokens, num_seqs, group_pad)
    if schedules is None:
        tiles = tile_schedule(cu_seqlens_q, num_tokens, block_q)
    elif (tiles := schedules.get(("attention", block_q))) is None:
        tiles = schedules[("attention", block_q)] = tile_schedule(cu_seqlens_q, num_tokens, block_q)
    # Real tiles: about one per sequence plus one per BQ tokens (the schedule's bound).
    splits = num_splits or _num_splits(q, num_seqs + num_tokens // block_q, num_kv_heads)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if splits > 1:
        m_split = torch.empty(splits, num_tokens, num_q_heads, dtype=torch.float32, device=q.device)
        l_split = torch.empty_like(m_split)
        acc_split = torch.empty(splits, num_tokens, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    else:
        m_split = l_split = acc_split = out  # unused
    block_tables = block_tables.contiguous()
    _paged_attention_kernel[(tiles.num_tiles, num_kv_heads, splits)](
        q, k_cache, v_cache, out, block_tables, context_lens.contiguous(), sinks.contiguous(),
        tiles.group, tiles.row_start, tiles.row_end, m_split, l_split, acc_split,
        float(sm_scale) * _LOG2E, int(window or 0), head_dim, num_tokens, num_q_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        BS=block_size, G=group, G_PAD=group_pad, BQ=block_q, BN=block_n, BD=block_d,
        HAS_WINDOW=window is not None, SPLIT=splits > 1,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", DOT_F32=interpreting(),
        num_warps=8 if block_q * group_pad >= 64 else 4,  # 64-row tiles spill at 4 warps
    )
    if splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            m_split, l_split, acc_split, sinks.contiguous(), out,
            splits, num_tokens, num_q_heads, head_dim, out.stride(0), out.stride(1),
            BSPLIT=triton.next_power_of_2(splits), BD=block_d,
        )
    return out
