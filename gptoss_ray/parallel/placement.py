"""Expert placement: which rank of an expert-parallel group owns which experts.

Each rank owns one contiguous range of global expert ids. Contiguous ranges keep the
loader simple (one `get_slice(start:end)` per tensor) and let the dispatcher find a
pair's owner with one lookup. When N does not divide E the first E % N ranks own one
expert more: 128 experts on 3 ranks = 43/43/42.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertPlacement:
    """Contiguous, as-even-as-possible split of `num_experts` over `world_size` ranks."""

    num_experts: int  # E: experts per MoE layer
    world_size: int  # N: ranks in the expert-parallel group

    def __post_init__(self) -> None:
        if self.num_experts < 1 or self.world_size < 1:
            raise ValueError(f"need num_experts >= 1 and world_size >= 1, got {self}")
        if self.world_size > self.num_experts:
            # A rank without experts would still pay for every all-to-all and hold
            # attention weights; refuse rather than silently waste a GPU.
            raise ValueError(
                f"ep_size {self.world_size} exceeds the {self.num_experts} experts per layer"
            )

    def counts(self) -> list[int]:
        """Experts owned by each rank, e.g. [43, 43, 42] for 128 on 3."""
        base, extra = divmod(self.num_experts, self.world_size)
        return [base + (1 if r < extra else 0) for r in range(self.world_size)]

    def range(self, rank: int) -> range:
        """Global expert ids owned by `rank`."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside 0..{self.world_size - 1}")
        counts = self.counts()
        start = sum(counts[:rank])
        return range(start, start + counts[rank])

    def ranges(self) -> list[range]:
        return [self.range(r) for r in range(self.world_size)]

    def owner_of(self, expert_id: int) -> int:
        for rank, owned in enumerate(self.ranges()):
            if expert_id in owned:
                return rank
        raise ValueError(f"expert {expert_id} outside 0..{self.num_experts - 1}")

    def owner_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """owner[e] = rank owning global expert e; [E] int64, for `owner[topk_ids]`."""
        counts = torch.tensor(self.counts(), dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(self.world_size), counts).to(device)
