"""The mixture-of-experts block: router, top-k, and the experts this instance holds.

Legend: T tokens, H hidden, E experts (all), K experts per token, N (token, expert) pairs.

Expert parallelism plugs in through `MoE.dispatcher` (gpt-fast's "parallelism applied
after the model is built"): the default computes every pair locally; the expert-parallel
one in gptoss_ray.parallel sends each pair to the rank owning its expert.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from gptoss_kernels.mxfp4 import dequantize_mxfp4
from gptoss_kernels import cpu_kernels, onednn
from gptoss_kernels.moe import dense_down_weight, dense_gate_up_weight, moe_experts_dense
from gptoss_kernels.ops import ExpertWeights, moe_experts, use_triton
from gptoss_kernels.routing import topk_softmax
from gptoss_ray.config import ModelConfig
from gptoss_ray.model.linear import Linear


class LocalExperts(nn.Module):
    """Experts [start, end) of one layer, MXFP4-packed (or plain for dequantized checkpoints).

    The tensors are buffers filled by the loader; packed weights stay uint8 in memory
    and are dequantized inside the expert matmul."""

    def __init__(self, config: ModelConfig, start: int, end: int, mxfp4: bool, dtype: torch.dtype, device):
        super().__init__()
        self.start, self.end = start, end
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit
        e, h, i = end - start, config.hidden_size, config.intermediate_size
        f = dict(dtype=dtype, device=device)
        u8 = dict(dtype=torch.uint8, device=device)
        self.register_buffer("gate_up_bias", torch.empty(e, 2 * i, **f))
        self.register_buffer("down_bias", torch.empty(e, h, **f))
        if mxfp4:
            self.register_buffer("gate_up_blocks", torch.empty(e, 2 * i, h // 32, 16, **u8))
            self.register_buffer("gate_up_scales", torch.empty(e, 2 * i, h // 32, **u8))
            self.register_buffer("down_blocks", torch.empty(e, h, i // 32, 16, **u8))
            self.register_buffer("down_scales", torch.empty(e, h, i // 32, **u8))
        else:
            self.register_buffer("gate_up_weight", torch.empty(e, 2 * i, h, **f))
            self.register_buffer("down_weight", torch.empty(e, h, i, **f))

    def weights(self) -> ExpertWeights:
        get = lambda name: getattr(self, name, None)  # noqa: E731
        return ExpertWeights(
            gate_up_bias=self.gate_up_bias, down_bias=self.down_bias,
            gate_up_blocks=get("gate_up_blocks"), gate_up_scales=get("gate_up_scales"),
            down_blocks=get("down_blocks"), down_scales=get("down_scales"),
            gate_up_weight=get("gate_up_weight"), down_weight=get("down_weight"),
        )

    def dequantize_(self) -> None:
        """Unpack MXFP4 once, for devices where no fused MXFP4 kernel runs and dequantizing
        inside every expert matmul (the reference) costs more than the matmul itself (CPU).
        Where the reference runs, unpack to float32 (~8x the packed memory): the MXFP4
        values are exact in it as in bf16, and a CPU's float32 matmuls are 2-3x faster than
        its bf16 ones at these shapes; elsewhere to the model's dtype (~4x in bf16)."""
        if not hasattr(self, "gate_up_blocks"):
            return
        dtype = self.gate_up_bias.dtype if use_triton(self.gate_up_bias) else torch.float32
        for proj in ("gate_up", "down"):
            dense = dequantize_mxfp4(getattr(self, f"{proj}_blocks"), getattr(self, f"{proj}_scales"), dtype)
            del self._buffers[f"{proj}_blocks"], self._buffers[f"{proj}_scales"]
            self.register_buffer(f"{proj}_weight", dense)

    def pack_for_cpu(self) -> bool:
        """Ready the plain experts of a CPU for decode steps (forward_decode). Where the C
        kernel builds (gptoss_kernels.cpu_kernels: AVX512-BF16 and a C compiler), bf16 and float32
        experts take it, reading the weights as they are. Otherwise, where oneDNN packs bf16
        weights, keep each projection also as one packed GEMM weight (+ its share of memory)
        for the dense path: gate_up as [E*2I, H] with its bias, each expert's gate rows before
        its up rows, and down as [H, E*I + E], every expert's down matrix side by side and then
        its bias as one more column each, so that one GEMM computes the K-way combine too
        (moe_experts_dense).
        Without the kernel, float32 experts stay on the grouped pairs path (densely they
        measured slower, 429 vs 384 ms per run of the 16 x 32 float32 workload). Returns
        whether either was set up."""
        w = getattr(self, "gate_up_weight", None)
        if w is None:
            return False
        if cpu_kernels.supports(w, self.down_weight):
            # the kernel takes every tensor in the weights' dtype (biases stay the model's)
            self._kernel_biases = (self.gate_up_bias.to(w.dtype).contiguous(), self.down_bias.to(w.dtype).contiguous())
            self._fused = True
            return True
        if w.dtype != torch.bfloat16 or not onednn.can_pack(w) or not onednn.can_pack(self.down_weight):
            return False
        w_dense, self._gate_up_bias_dense = dense_gate_up_weight(w, self.gate_up_bias)  # [E*2I, H], [E*2I]
        self._gate_up_packed = onednn.pack_weight(w_dense)
        self._down_packed = onednn.pack_weight(dense_down_weight(self.down_weight, self.down_bias))  # [H, E*I + E]
        return True

    _fused = False  # decode steps take gptoss_kernels.cpu_kernels (pack_for_cpu)

    def use_decode_path(self, num_tokens: int, top_k: int) -> bool:
        """Whether forward_decode (the C kernel or the dense GEMMs) takes this step. The C
        kernel reads only the chosen experts, once each: it pays for any decode-sized step (up
        to 4 pairs per expert); beyond, the grouped matmuls' larger tiles win (at 512 tokens it
        measured no faster). The dense GEMMs pay where pairs cover most experts a few rows
        each (E..4E pairs: decode batches); below, they would read experts nobody chose;
        above, their E/K extra flops show (benchmarks/RESULTS.md, 'CPU decode step')."""
        e, pairs = self.end - self.start, num_tokens * top_k
        if self._fused:
            return pairs <= 4 * e
        return hasattr(self, "_gate_up_packed") and e <= pairs <= 4 * e

    def forward_decode(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, K] global ids (all local), topk_weights [T, K] -> [T, H], summed
        over K: through the C kernel where pack_for_cpu set it up, else the dense packed GEMMs."""
        # local ids; local_dispatch calls this with every expert here (start 0): no op then
        ids = topk_ids if self.start == 0 else topk_ids - self.start
        if self._fused:  # in the experts' dtype (float32 ones under a bf16 model: compute_dtype)
            gate_up_bias, down_bias = self._kernel_biases
            out = cpu_kernels.moe_decode(x, ids, topk_weights, self.gate_up_weight, gate_up_bias,
                                         self.down_weight, down_bias, self.alpha, self.limit)
            return out.to(x.dtype)

        def gate_up(a):
            return onednn.packed_linear(a, self._gate_up_packed, self._gate_up_bias_dense)

        def down(a):
            return onednn.packed_linear(a, self._down_packed)

        return moe_experts_dense(x, ids, topk_weights, gate_up, down, self.end - self.start,
                                 self.alpha, self.limit)

    def forward_pairs(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H], expert_ids [N] global ids in [start, end), weights [N] -> weighted outputs [N, H]."""
        return moe_experts(x, expert_ids - self.start, weights, self.weights(), self.alpha, self.limit)


class Dispatcher(Protocol):
    def __call__(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor: ...


def local_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts) -> torch.Tensor:
    """All experts are here: compute the T*K pairs and sum each token's K outputs."""
    t, k = topk_ids.shape
    if experts.use_decode_path(t, k):
        return experts.forward_decode(x, topk_ids, topk_weights)
    rows = torch.arange(t, device=x.device).repeat_interleave(k)  # [N]: the token of each pair
    out = experts.forward_pairs(x[rows], topk_ids.reshape(-1), topk_weights.reshape(-1))  # [N, H]
    return out.view(t, k, x.shape[-1]).sum(dim=1)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, experts: range, mxfp4: bool, dtype: torch.dtype, device):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = Linear(config.hidden_size, config.num_local_experts, bias=True, dtype=dtype, device=device)
        self.experts = LocalExperts(config, experts.start, experts.stop, mxfp4, dtype, device)
        self.dispatcher: Dispatcher = local_dispatch
        self.record_expert_load = False
        self.register_buffer(
            "expert_counts", torch.zeros(config.num_local_experts, dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer("_one", torch.ones((), dtype=torch.int64, device=device), persistent=False)

    def finish_loading(self) -> None:
        self.expert_counts.zero_()
        self._one.fill_(1)

    def forward(self, x: torch.Tensor, valid_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """valid_tokens [T] int64 (1 real, 0 padding; None = all real): what the expert-load metric counts."""
        topk_ids, topk_weights = topk_softmax(self.router(x), self.top_k)  # [T, K]: softmax over the chosen K only
        if self.record_expert_load:  # an accumulating index_put, not bincount: no device sync, one op
            counts = self._one if valid_tokens is None else valid_tokens[:, None].expand(-1, self.top_k).reshape(-1)
            self.expert_counts.index_put_((topk_ids.reshape(-1),), counts, accumulate=True)
        return self.dispatcher(x, topk_ids, topk_weights.to(x.dtype), self.experts)
