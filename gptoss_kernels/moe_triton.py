"""Triton MoE experts: grouped matmuls over (token, expert) pairs sorted by expert, reading
MXFP4 weights and dequantizing them in registers (so A100, which has no FP4 units, runs them),
with the gate_up bias and clamped SwiGLU fused into the first matmul's epilogue and the down
bias and routing weight fused into the second's.

Legend: N pairs, H hidden, I expert intermediate size, E local experts, BM/BN/BK tile sizes.

Same contract as `moe.moe_experts_ref`: row n of the output = weights[n] * expert_{ids[n]}(x[n]).

Data flow:
  sort_by_expert(ids)      -> order [N], expert_offsets [E+1]       (routing.py, no device sync)
  tile_schedule            -> tiles of <= BM sorted rows of one expert
  _gate_up_swiglu_kernel   x[order] @ W_gu[e]^T + b -> SwiGLU -> act [N, I] (sorted order)
  _down_kernel             act @ W_d[e]^T + b, * weights[order] -> out[order] (pair order)
Each output row is written by exactly one program, so the scatter needs no atomics.

MXFP4 in registers: a byte holds two FP4 (E2M1) weights, low nibble = even column, and each
32-weight group (16 bytes) shares one E8M0 scale 2^(s-127). Rather than interleaving nibbles
back into a row, the activations are read as even and odd columns and, per group, two dots of
depth 16 are summed: x_even @ W_lo + x_odd @ W_hi, with the group's scale a [BN] vector.
Dense (unquantized) expert weights take the same kernels with QUANT=False.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

from .routing import check_launchable, interpreting, sort_by_expert, tile_schedule

if TYPE_CHECKING:
    from .moe import ExpertWeights


@triton.jit
def _fp4_e2m1_times2(nibble):
    """FP4 E2M1 nibble (int32 0..15) -> 2 * its value as float32 (exact), in integer ops only.

    Sign bit 3, exponent e bits 2..1, mantissa m bit 0: 2*|value| = m when e == 0, else
    (2 + m) << (e - 1), i.e. 0, 1, 2, 3, 4, 6, 8, 12. Shifts instead of exp2 keep the special
    function unit free; dequantization is per weight and sits on the decode critical path."""
    exponent = (nibble >> 1) & 3
    mantissa = nibble & 1
    twice = tl.where(exponent == 0, mantissa, (2 | mantissa) << (tl.maximum(exponent, 1) - 1)).to(tl.float32)
    return tl.where((nibble & 8) != 0, -twice, twice)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b. DOT_F32 upcasts the operands: Triton's interpreter multiplies the raw bit
    patterns of bf16 operands (triton-lang/triton#11584, still so in 3.9); bf16 products are exact
    in float32, so the upcast result equals the GPU's."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _grouped_dot(
    acc, x_ptr, x_rows, row_mask, w_ptr, s_ptr, w_rows, s_rows, col_mask, K, stride_wk,
    QUANT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
):
    """acc [BM, BN] += x[x_rows, :K] @ W[w_rows, :K]^T.

    x_rows [BM]: element offsets of the activation rows; w_rows [BN]: offsets of the weight rows
    (bytes of blocks when QUANT, elements of the dense weight otherwise); s_rows [BN]: offsets of
    the scale rows (QUANT only). Rows of x are contiguous along K."""
    for k0 in range(0, K, BK):
        if QUANT:
            # One 32-weight group (16 bytes, one scale per weight row) at a time: the scale is a
            # [BN] vector broadcast over the group instead of a gathered [16, BN] tile.
            for group in tl.static_range(BK // 32):
                g0 = k0 + 32 * group  # first column of the group; K is a multiple of 32
                byte_idx = g0 // 2 + tl.arange(0, 16)  # [16] bytes of this group
                k_even = 2 * byte_idx  # [16] even columns, the low nibbles
                k_mask = k_even < K
                x_mask = row_mask[:, None] & k_mask[None, :]
                x_even = tl.load(x_ptr + x_rows[:, None] + k_even[None, :], mask=x_mask, other=0.0)
                x_odd = tl.load(x_ptr + x_rows[:, None] + k_even[None, :] + 1, mask=x_mask, other=0.0)
                w_mask = k_mask[:, None] & col_mask[None, :]
                packed = tl.load(w_ptr + w_rows[None, :] + byte_idx[:, None], mask=w_mask, other=0).to(tl.int32)
                # Past the end (K % BK != 0) the bytes load as 0, so any in-bounds scale will do.
                scale_byte = tl.load(s_ptr + s_rows + tl.minimum(g0, K - 32) // 32, mask=col_mask, other=127)
                half_scale = tl.exp2(scale_byte.to(tl.float32) - 128.0)[None, :]  # [1, BN] 2^(s-127) / 2
                w_lo = (_fp4_e2m1_times2(packed & 15) * half_scale).to(x_even.dtype)
                w_hi = (_fp4_e2m1_times2(packed >> 4) * half_scale).to(x_even.dtype)
                acc = _dot(x_even, w_lo, acc, PREC, DOT_F32)
                acc = _dot(x_odd, w_hi, acc, PREC, DOT_F32)
        else:
            kk = k0 + tl.arange(0, BK)
            k_mask = kk < K
            x_tile = tl.load(x_ptr + x_rows[:, None] + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(
                w_ptr + w_rows[None, :] + kk[:, None] * stride_wk, mask=k_mask[:, None] & col_mask[None, :], other=0.0
            )
            acc = _dot(x_tile, w_tile.to(x_tile.dtype), acc, PREC, DOT_F32)
    return acc


@triton.jit
def _gate_up_swiglu_kernel(
    x_ptr, order_ptr, tile_group_ptr, tile_start_ptr, tile_end_ptr,
    w_ptr, s_ptr, bias_ptr, act_ptr,
    H, I, stride_x, stride_we, stride_wrow, stride_wk, stride_se, stride_srow, stride_be, stride_act,
    alpha, limit,
    QUANT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """One tile of <= BM sorted rows of one expert x BN intermediate columns."""
    tile = tl.program_id(0)
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    if row_start >= row_end:  # padding tile of the sync-free schedule
        return
    expert = tl.load(tile_group_ptr + tile).to(tl.int64)
    rows = row_start + tl.arange(0, BM)  # [BM] sorted positions
    row_mask = rows < row_end
    pairs = tl.load(order_ptr + rows, mask=row_mask, other=0)  # [BM] pair index: gather x in-kernel
    x_rows = pairs.to(tl.int64) * stride_x
    # Interleaved gate_up: weight rows 2j (gate) and 2j+1 (up) are neighbours, so the tile is one
    # matmul over 2*BN consecutive rows whose accumulator columns are then split even/odd.
    wcols = tl.program_id(1) * (2 * BN) + tl.arange(0, 2 * BN)  # [2BN] gate_up weight rows
    wcol_mask = wcols < 2 * I
    w_rows = expert * stride_we + wcols.to(tl.int64) * stride_wrow
    s_rows = expert * stride_se + wcols.to(tl.int64) * stride_srow
    acc = tl.zeros((BM, 2 * BN), dtype=tl.float32)
    acc = _grouped_dot(acc, x_ptr, x_rows, row_mask, w_ptr, s_ptr, w_rows, s_rows, wcol_mask, H, stride_wk,
                       QUANT, BK, PREC, DOT_F32)
    acc += tl.load(bias_ptr + expert * stride_be + wcols, mask=wcol_mask, other=0.0).to(tl.float32)[None, :]
    gate, up = tl.split(tl.reshape(acc, (BM, BN, 2)))  # [BM, BN] each: columns 2j and 2j+1
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] intermediate columns
    col_mask = cols < I
    gate = tl.minimum(gate, limit)
    up = tl.minimum(tl.maximum(up, -limit), limit)
    out = (up + 1.0) * gate * tl.sigmoid(alpha * gate)
    act_ptrs = act_ptr + rows.to(tl.int64)[:, None] * stride_act + cols[None, :]
    tl.store(act_ptrs, out.to(act_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _down_kernel(
    act_ptr, order_ptr, route_w_ptr, tile_group_ptr, tile_start_ptr, tile_end_ptr,
    w_ptr, s_ptr, bias_ptr, out_ptr,
    H, I, stride_act, stride_we, stride_wrow, stride_wk, stride_se, stride_srow, stride_be, stride_out,
    QUANT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """One tile of <= BM sorted rows of one expert x BN hidden columns; scatters to pair order."""
    tile = tl.program_id(0)
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(tile_end_ptr + tile)
    if row_start >= row_end:
        return
    expert = tl.load(tile_group_ptr + tile).to(tl.int64)
    rows = row_start + tl.arange(0, BM)
    row_mask = rows < row_end
    pairs = tl.load(order_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] hidden columns
    col_mask = cols < H
    w_rows = expert * stride_we + cols.to(tl.int64) * stride_wrow
    s_rows = expert * stride_se + cols.to(tl.int64) * stride_srow
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc = _grouped_dot(acc, act_ptr, rows.to(tl.int64) * stride_act, row_mask, w_ptr, s_ptr, w_rows, s_rows, col_mask,
                       I, stride_wk, QUANT, BK, PREC, DOT_F32)
    acc += tl.load(bias_ptr + expert * stride_be + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    route_w = tl.load(route_w_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    out_ptrs = out_ptr + pairs[:, None] * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


class _WeightArgs(NamedTuple):
    """One projection's weight as the kernels take it."""

    w: torch.Tensor  # MXFP4 blocks [E, R, K/32, 16] u8, or the dense weight [E, R, K]
    s: torch.Tensor  # scales [E, R, K/32] u8 (dense: the weight again, never read)
    quantized: bool
    stride_e: int  # per expert, in bytes (blocks) or elements (dense)
    stride_row: int
    stride_k: int  # dense only; a blocks row is one contiguous run of bytes
    scale_stride_e: int
    scale_stride_row: int


def _weight_args(blocks: torch.Tensor | None, scales: torch.Tensor | None, dense: torch.Tensor | None) -> _WeightArgs:
    if blocks is not None:
        blocks, scales = blocks.contiguous(), scales.contiguous()  # byte b of a row = group b // 16
        return _WeightArgs(blocks, scales, True, blocks.stride(0), blocks.stride(1), 1, scales.stride(0),
                           scales.stride(1))
    if dense is None:
        raise ValueError("ExpertWeights has neither MXFP4 blocks nor a dense weight")
    return _WeightArgs(dense, dense, False, dense.stride(0), dense.stride(1), dense.stride(2), 0, 0)


def _block_sizes(num_pairs: int, num_experts: int) -> tuple[int, int, int]:
    """(BM, BN, BK). BM follows the mean load per expert so decode does not pad 1 row to 64."""
    mean_load = max(1, num_pairs // max(1, num_experts))
    block_m = 16 if mean_load <= 16 else (32 if mean_load <= 32 else 64)
    return block_m, 64, 64


def moe_experts_triton(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w: ExpertWeights,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """x [N, H], expert_ids [N] local expert index, weights [N] -> [N, H] (x.dtype).

    Row n = weights[n] * expert_{ids[n]}(x[n]), as moe_experts_ref."""
    num_pairs, hidden = x.shape
    num_experts, two_i = w.gate_up_bias.shape
    inter = two_i // 2
    out = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    if num_pairs == 0:
        return out
    check_launchable(x)
    x = x.contiguous()
    sort = sort_by_expert(expert_ids, num_experts)
    block_m, block_n, block_k = _block_sizes(num_pairs, num_experts)
    tiles = tile_schedule(sort.expert_offsets, num_pairs, block_m)
    # TF32 would cost float32 its 1e-5 agreement with the reference; bf16 runs at full rate.
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    dot_f32 = interpreting()
    # 64-row tiles spill registers at 4 warps (cuobjdump -res-usage of the sm_80/sm_90 cubins).
    num_warps = 8 if block_m >= 64 else 4

    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [N, I] sorted order
    gu = _weight_args(w.gate_up_blocks, w.gate_up_scales, w.gate_up_weight)
    gu_bias = w.gate_up_bias.contiguous()
    # gate_up tiles span 2 * (block_n // 2) weight rows, so both kernels hold [BM, block_n] accumulators.
    _gate_up_swiglu_kernel[(tiles.num_tiles, triton.cdiv(inter, block_n // 2))](
        x, sort.order, tiles.group, tiles.row_start, tiles.row_end,
        gu.w, gu.s, gu_bias, act,
        hidden, inter, x.stride(0), gu.stride_e, gu.stride_row, gu.stride_k, gu.scale_stride_e, gu.scale_stride_row,
        gu_bias.stride(0), act.stride(0), float(alpha), float(limit),
        QUANT=gu.quantized, BM=block_m, BN=block_n // 2, BK=block_k, PREC=prec, DOT_F32=dot_f32, num_warps=num_warps,
    )
    dn = _weight_args(w.down_blocks, w.down_scales, w.down_weight)
    dn_bias = w.down_bias.contiguous()
    route_w = weights.reshape(-1).contiguous()
    _down_kernel[(tiles.num_tiles, triton.cdiv(hidden, block_n))](
        act, sort.order, route_w, tiles.group, tiles.row_start, tiles.row_end,
        dn.w, dn.s, dn_bias, out,
        hidden, inter, act.stride(0), dn.stride_e, dn.stride_row, dn.stride_k, dn.scale_stride_e, dn.scale_stride_row,
        dn_bias.stride(0), out.stride(0),
        QUANT=dn.quantized, BM=block_m, BN=block_n, BK=block_k, PREC=prec, DOT_F32=dot_f32, num_warps=num_warps,
    )
    return out
