"""Mixture-of-experts expert computation, the torch reference.

Legend: N (token, expert) pairs, H hidden, I expert intermediate size, E local experts.
Each pair is one token sent to one of its top-k experts; the caller sums the k pair
outputs of a token (locally, or after the expert-parallel combine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptoss_kernels.mxfp4 import dequantize_mxfp4


@dataclass
class ExpertWeights:
    """The experts one worker holds. Either the MXFP4 pair (blocks, scales) or the plain
    weight is set for each projection. gate_up rows are interleaved: gate = even rows,
    up = odd rows (the layout of the openai checkpoints)."""

    gate_up_bias: torch.Tensor  # [E, 2I]
    down_bias: torch.Tensor  # [E, H]
    gate_up_blocks: torch.Tensor | None = None  # [E, 2I, H/32, 16] uint8
    gate_up_scales: torch.Tensor | None = None  # [E, 2I, H/32] uint8
    down_blocks: torch.Tensor | None = None  # [E, H, I/32, 16] uint8
    down_scales: torch.Tensor | None = None  # [E, H, I/32] uint8
    gate_up_weight: torch.Tensor | None = None  # [E, 2I, H] unquantized checkpoints
    down_weight: torch.Tensor | None = None  # [E, H, I]

    @property
    def num_experts(self) -> int:
        return self.gate_up_bias.shape[0]

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """Activations' dtype, or the plain weights' when wider: experts unpacked to float32
        for a bf16 model (on CPU, where float32 matmuls are the faster ones) compute in
        float32 and round the output to bf16, as the Triton kernel accumulates in float32."""
        if self.gate_up_weight is None:
            return x_dtype
        return torch.promote_types(x_dtype, self.gate_up_weight.dtype)

    def gate_up(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's gate_up matrix [2I, H], dequantized."""
        if self.gate_up_weight is not None:
            return self.gate_up_weight[e].to(dtype)
        return dequantize_mxfp4(self.gate_up_blocks[e], self.gate_up_scales[e], dtype)

    def down(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        """Expert e's down matrix [H, I], dequantized."""
        if self.down_weight is not None:
            return self.down_weight[e].to(dtype)
        return dequantize_mxfp4(self.down_blocks[e], self.down_scales[e], dtype)


def swiglu(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU over interleaved [.., 2I] -> [.., I]."""
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


# Measured on one CPU core (torch 2.13): the grouped matmul beats the loop of addmm up to
# about 32 rows per expert and loses a little beyond (MKL's larger tiles win there).
GROUPED_MAX_ROWS_PER_EXPERT = 32


def moe_experts_ref(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    w: ExpertWeights,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """x [N, H], expert_ids [N] (local 0..E-1), weights [N] -> [N, H]: row n is
    weights[n] * expert_{ids[n]}(x[n]). Loops over the experts present, dequantizing
    each one's weights once (the Triton kernel does it in registers instead). With plain
    (dequantized) weights on CPU and few pairs per expert (decode steps), one grouped
    matmul per projection replaces the loop and its per-expert Python."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if w.gate_up_weight is not None and not x.is_cuda and x.shape[0] <= GROUPED_MAX_ROWS_PER_EXPERT * w.num_experts:
        return _moe_experts_grouped(x, expert_ids, weights, w, alpha, limit)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=w.num_experts).tolist()
    dtype = w.compute_dtype(x.dtype)
    xs, ws = x[order].to(dtype), weights[order, None].to(dtype)  # pairs grouped by expert: contiguous slices
    gate_up_bias, down_bias = w.gate_up_bias.to(dtype), w.down_bias.to(dtype)
    out_sorted = torch.empty_like(xs)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        end = start + count
        h = torch.addmm(gate_up_bias[e], xs[start:end], w.gate_up(e, dtype).T)  # [n, 2I]
        h = swiglu(h, alpha, limit)  # [n, I]
        y = torch.addmm(down_bias[e], h, w.down(e, dtype).T)  # [n, H]
        out_sorted[start:end] = y * ws[start:end]
        start = end
    out = torch.empty_like(x)
    out[order] = out_sorted.to(x.dtype)
    return out


def _moe_experts_grouped(x, expert_ids, weights, w: ExpertWeights, alpha: float, limit: float) -> torch.Tensor:
    """moe_experts_ref with plain weights, as two grouped matmuls over the pairs sorted by
    expert (`offs[e]` ends expert e's rows)."""
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids[order]
    offs = torch.bincount(expert_ids, minlength=w.num_experts).cumsum(0).to(torch.int32)
    dtype = w.compute_dtype(x.dtype)
    gate_up_w, down_w = w.gate_up_weight.to(dtype), w.down_weight.to(dtype)
    h = F.grouped_mm(x[order].to(dtype), gate_up_w.transpose(1, 2), offs=offs)  # [N, 2I]
    h = swiglu(h + w.gate_up_bias.to(dtype)[sorted_ids], alpha, limit)  # [N, I]
    y = F.grouped_mm(h, down_w.transpose(1, 2), offs=offs) + w.down_bias.to(dtype)[sorted_ids]  # [N, H]
    out = torch.empty_like(x)
    out[order] = (y * weights[order, None].to(dtype)).to(x.dtype)
    return out


def dense_gate_up_weight(gate_up_weight: torch.Tensor, gate_up_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [E, 2I, H] (gate = even rows, up = odd rows) and its bias [E, 2I] -> the
    [E*2I, H] weight and [E*2I] bias moe_experts_dense's gate_up GEMM multiplies: per expert
    its I gate rows, then its I up rows, so that the activation reads two contiguous halves."""
    e, two_i, h = gate_up_weight.shape
    w = torch.cat([gate_up_weight[:, 0::2], gate_up_weight[:, 1::2]], dim=1)  # [E, 2I, H] de-interleaved
    b = torch.cat([gate_up_bias[:, 0::2], gate_up_bias[:, 1::2]], dim=1)
    return w.reshape(e * two_i, h).contiguous(), b.reshape(-1).contiguous()


def dense_down_weight(down_weight: torch.Tensor, down_bias: torch.Tensor) -> torch.Tensor:
    """down [E, H, I] and its bias [E, H] -> the [H, E*I + E] matrix moe_experts_dense's down
    GEMM multiplies: every expert's down matrix side by side, then the biases as E columns."""
    return torch.cat([down_weight.permute(1, 0, 2).reshape(down_weight.shape[1], -1), down_bias.T], dim=1)


def moe_experts_dense(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up_linear,
    down_linear,
    num_experts: int,
    alpha: float = 1.702,
    limit: float = 7.0,
) -> torch.Tensor:
    """Every token through every local expert, the K chosen ones weighted, the rest by 0:
    x [T, H], topk_ids [T, K] (local), topk_weights [T, K] -> [T, H].

    For CPU decode steps, where T*K pairs spread over all E experts 1-4 rows each: the
    grouped matmul then loops over E experts with a few rows apiece, while reading every
    expert's weights anyway. Here the whole layer is two GEMMs, each one call with a
    pre-packed oneDNN weight on CPU:
      - gate_up: `gate_up_linear(x)` -> [T, E*2I] with its bias, against dense_gate_up_weight
        (each expert's gate rows, then its up rows);
      - down and the K-way combine at once: out[t] = sum_e w[t,e] (act[t,e] @ down_e^T + b_e)
        is linear in w[t,e] * act[t,e], so with A = [w * act (flattened over E), w] [T, E*I + E]
        it is `down_linear(A)` against the experts' down matrices side by side plus their
        biases as E more columns (dense_down_weight).
    E/K times the flops of the pairs, which costs nothing extra while the weights' bytes
    bound the step; the E-expert sum accumulates in float32 inside the GEMM. Unchosen
    experts' activations are finite (SwiGLU clamps), so their zero weight removes them exactly.
    The activation runs in float32 in place (a dozen ops over [T, E, I], as few as eager allows):
    (up + 1) * gate * sigmoid(alpha * gate) * w = (up + 1) * silu(alpha * gate) * (w / alpha)."""
    t, e = x.shape[0], num_experts
    h = gate_up_linear(x).view(t, e, -1)  # [T, E, 2I]
    i = h.shape[-1] // 2
    gate = h[..., :i].float().contiguous().clamp_(max=limit).mul_(alpha)  # a copy whatever the dtype
    act = h[..., i:].float().contiguous().clamp_(-limit, limit).add_(1).mul_(torch.nn.functional.silu(gate, inplace=True))
    dense_w = torch.zeros(t, e, dtype=torch.float32, device=x.device).scatter_(1, topk_ids, topk_weights.float())
    act.mul_(dense_w[:, :, None] / alpha)  # [T, E, I]
    a = torch.cat([act.view(t, -1), dense_w], dim=1).to(x.dtype)  # [T, E*I + E]
    return down_linear(a).to(x.dtype)
