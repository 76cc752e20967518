"""bfloat16 linear layers through oneDNN with the weight pre-packed once, for CPUs.

torch's F.linear hands oneDNN a plain row-major weight on every call, which it reorders
into its blocked layout (the one AMX / AVX512-BF16 tiles read) each time. Reordering once
at load, as vLLM's CPU backend and inductor's freezing pass do, makes a decode step's
201k-row unembedding 1.7x faster on a Sapphire Rapids core (11 ms instead of 19 ms for 16
rows, the same bits: benchmarks/RESULTS.md). float32 weights gain nothing, so only
bfloat16 ones are packed; nothing here runs on CUDA.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def bf16_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and bf16_packing_available()


def pack_weight(weight: torch.Tensor, rows_hint: int = 16) -> torch.Tensor:
    """[N, K] bf16 -> the same values in oneDNN's blocked layout (only packed_linear reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 -> x @ W.T + bias [M, N], W packed by pack_weight."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
