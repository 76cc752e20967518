"""The entry points the model calls. Each picks the fused Triton kernel on CUDA tensors and
the torch reference elsewhere (for CPU decode steps' attention, cpu_kernels' C kernel, or
attention_cpu's fused torch path where that cannot build);
GPTOSS_KERNELS=reference forces the reference, and GPTOSS_KERNELS=triton forces Triton (on
CPU that needs TRITON_INTERPRET=1)."""

from __future__ import annotations

import os

import torch

from gptoss_kernels import cpu_kernels
from gptoss_kernels.attention import paged_attention_ref, store_kv
from gptoss_kernels.attention_cpu import paged_decode_cpu
from gptoss_kernels.moe import ExpertWeights, moe_experts_ref

__all__ = ["ExpertWeights", "moe_experts", "paged_attention", "store_kv", "use_triton"]


def _choice() -> str:
    return os.environ.get("GPTOSS_KERNELS", "auto")


def use_triton(t: torch.Tensor) -> bool:
    choice = _choice()
    if choice == "reference":
        return False
    if choice == "triton":
        return True
    return t.is_cuda


def moe_experts(x, expert_ids, weights, w: ExpertWeights, alpha: float = 1.702, limit: float = 7.0):
    if use_triton(x):
        # Imported on first use: triton is optional on CPU, and it must see TRITON_INTERPRET
        # when its kernels are defined.
        from gptoss_kernels.moe_triton import moe_experts_triton

        return moe_experts_triton(x, expert_ids, weights, w, alpha, limit)
    return moe_experts_ref(x, expert_ids, weights, w, alpha, limit)


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks, sm_scale, window=None,
                    schedules: dict | None = None):
    """schedules: per-step memo (one per step, not per layer): the Triton path keeps its tile
    schedule in it, the CPU decode path what the step reads (attention_cpu)."""
    if q.shape[0] == 0:
        # A step with no tokens on this rank (an expert-parallel rank that still joins every
        # MoE all-to-all): nothing to attend, and neither kernel takes an empty batch.
        return torch.empty_like(q)
    if use_triton(q):
        from gptoss_kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks, sm_scale, window,
            schedules=schedules,
        )
    if q.shape[0] == block_tables.shape[0] and _choice() == "auto" and not q.is_cuda:  # T == B: a decode step
        if cpu_kernels.attention_takes(q, k_cache):  # one C call, read from the paged cache in place
            return cpu_kernels.paged_decode(q, k_cache, v_cache, block_tables, context_lens, sinks, sm_scale, window)
        return paged_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, sinks, sm_scale, window,
                                memo=schedules)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, sinks, sm_scale, window)
