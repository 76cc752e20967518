"""Token routing for the MoE layers: router top-k, the sort of (token, expert) pairs by
expert, and the tile schedule the grouped Triton kernels run over.

Legend: T tokens, E experts, K experts per token, N = T*K (token, expert) pairs,
BM rows per tile, NT tiles.

Everything here is plain torch and never syncs with the device (no `.item()`, no
data-dependent output shapes), so it can sit inside a captured CUDA graph and costs a few
small kernels per layer. The same `ExpertSort` is what an expert-parallel dispatcher needs:
pairs grouped by expert, with per-expert offsets, so that each destination rank receives one
contiguous slice. The tile schedule also serves paged attention (groups = sequences).
`interpreting` / `check_launchable` are the small launch helpers both Triton modules share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def topk_softmax(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: the top-k router logits per token, softmax over those k only.

    router_logits [T, E] -> (topk_ids [T, K] int64, topk_weights [T, K] float32).
    The softmax runs in float32 so bf16 logits route exactly like the float32 model.
    """
    values, ids = torch.topk(router_logits, k, dim=-1, sorted=True)  # [T, K] (ids are int64)
    return ids, torch.softmax(values, dim=-1, dtype=torch.float32)  # upcast inside the softmax: one op


@dataclass(frozen=True)
class ExpertSort:
    """(token, expert) pairs grouped by expert; stable, so pairs of one expert keep token order."""

    # [N] int64: pair index at each sorted position (sorted row r holds pair order[r]).
    order: torch.Tensor
    # [E+1] int64: sorted rows of expert e are expert_offsets[e] .. expert_offsets[e+1]-1.
    expert_offsets: torch.Tensor
    # [E] int64: pairs per expert (the load; expert_offsets is its exclusive cumsum).
    counts: torch.Tensor


def sort_by_expert(expert_ids: torch.Tensor, num_experts: int) -> ExpertSort:
    """Group pairs by expert. expert_ids [N] int (0..num_experts-1) -> ExpertSort.

    Ids outside [0, num_experts) are not allowed (they would corrupt the offsets)."""
    expert_ids = expert_ids.reshape(-1)
    order = torch.sort(expert_ids, stable=True).indices  # [N]
    # scatter_add rather than bincount: bincount sizes its output from max(ids), a device sync.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids.to(torch.int64), torch.ones_like(expert_ids, dtype=torch.int64))  # [E]
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_ids.device)
    torch.cumsum(counts, 0, out=expert_offsets[1:])
    return ExpertSort(order=order, expert_offsets=expert_offsets, counts=counts)


@dataclass(frozen=True)
class TileSchedule:
    """Tiles of at most BM consecutive rows that never straddle two groups.

    Groups are experts (MoE) or sequences (attention). The number of tiles is an upper bound
    known without a device sync: sum_g ceil(n_g / BM) <= N // BM + G. Tiles past the real
    count have group == G and an empty row range; kernels return early on them."""

    # [NT] int32: group of each tile (G = padding tile, do nothing).
    group: torch.Tensor
    # [NT] int32: first row of the tile (rows are positions in the grouped/sorted order).
    row_start: torch.Tensor
    # [NT] int32: one past the last row of the tile's group; the tile covers
    # row_start .. min(row_start + BM, row_end) - 1.
    row_end: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.group.shape[0]


def tile_schedule(group_offsets: torch.Tensor, num_rows: int, block_m: int) -> TileSchedule:
    """Cut each group's rows into tiles of block_m.

    group_offsets [G+1] int (exclusive cumsum of group sizes, group_offsets[G] == num_rows).
    num_rows is passed in (not read from the tensor) so that no device sync is needed."""
    device = group_offsets.device
    offsets = group_offsets.to(torch.int64)
    num_groups = offsets.shape[0] - 1
    sizes = offsets[1:] - offsets[:-1]  # [G]
    tiles_per_group = (sizes + block_m - 1) // block_m  # [G]
    tile_ends = torch.cumsum(tiles_per_group, 0)  # [G] inclusive cumsum
    max_tiles = num_rows // block_m + num_groups
    tile_ids = torch.arange(max_tiles, device=device)
    group = torch.searchsorted(tile_ends, tile_ids, right=True)  # [NT] in 0..G
    safe = group.clamp(max=num_groups - 1) if num_groups > 0 else group
    first_tile = tile_ends[safe] - tiles_per_group[safe] if num_groups > 0 else tile_ids
    valid = group < num_groups
    row_start = torch.where(valid, offsets[safe] + (tile_ids - first_tile) * block_m, 0)
    row_end = torch.where(valid, offsets[safe + 1], 0) if num_groups > 0 else row_start
    return TileSchedule(
        group=group.to(torch.int32), row_start=row_start.to(torch.int32), row_end=row_end.to(torch.int32)
    )


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_launchable(t: torch.Tensor) -> None:
    """Fail with a clear message instead of Triton's driver error when a kernel gets CPU tensors."""
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            "Triton kernels got CPU tensors: set TRITON_INTERPRET=1 before gptoss_kernels is imported, "
            "or GPTOSS_KERNELS=reference"
        )
