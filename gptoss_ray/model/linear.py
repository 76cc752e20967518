"""nn.Linear with an optional oneDNN pre-packed copy of its weight, for CPUs.

Every projection a decode step runs (q/k/v, o, the router, the unembedding) is a small-M
GEMM on CPU, where torch's plain F.linear reorders the weight into oneDNN's blocked layout
on every call: at 16 rows a [256, 384] projection cost ~125 us that way, most of it the
reorder. `pack_for_cpu` reorders once (gptoss_kernels.onednn); the plain weight stays, so
parameter names, loading and every other device are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from gptoss_kernels import onednn


class Linear(nn.Linear):
    packed: torch.Tensor | None = None  # the weight in oneDNN's layout, once pack_for_cpu ran

    def pack_for_cpu(self) -> bool:
        """Pack a CPU weight where it pays (onednn.can_pack). Returns whether it did."""
        if not onednn.can_pack(self.weight):
            return False
        self.packed = onednn.pack_weight(self.weight)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.shape[0] > 0 and x.dtype == self.weight.dtype:
            return onednn.packed_linear(x, self.packed, self.bias)
        return super().forward(x)
