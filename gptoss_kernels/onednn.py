"""Linear layers through oneDNN with the weight pre-packed once, for CPUs.

torch's F.linear hands oneDNN a plain row-major weight on every call, which it reorders
into its blocked layout (the one AMX / AVX512-BF16 tiles read) each time. Reordering once
at load, as vLLM's CPU backend and inductor's freezing pass do, makes a decode step's
201k-row unembedding 1.7x faster on a Sapphire Rapids core (11 ms instead of 19 ms for 16
rows, the same bits: benchmarks/RESULTS.md). bfloat16 weights gain at every size. float32
ones gain only when large (16 rows on 2 cores: the 201k x 256 unembedding 21.6 -> 14.5 ms,
the experts' [16384, 256] gate_up 1.09 -> 0.74 ms) and lose when small (a [256, 256]
projection 22 -> 35 us: oneDNN's per-call cost), so only those are packed. Nothing here
runs on CUDA.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def bf16_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


FLOAT32_MIN_ELEMENTS = 1 << 21  # 8 MB: below it oneDNN's per-call cost outweighs the packed layout


def packs(dtype: torch.dtype, numel: int) -> bool:
    """Whether a CPU weight of this dtype and size is worth packing: any bf16 one where oneDNN
    has bf16 kernels, a large float32 one (the memory planner asks this before loading)."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bf16_packing_available()
    return dtype == torch.float32 and numel >= FLOAT32_MIN_ELEMENTS


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and packs(weight.dtype, weight.numel())


def pack_weight(weight: torch.Tensor, rows_hint: int = 16) -> torch.Tensor:
    """[N, K] -> the same values in oneDNN's blocked layout (only packed_linear reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] -> x @ W.T + bias [M, N], W packed by pack_weight (x, W and bias of one dtype)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
