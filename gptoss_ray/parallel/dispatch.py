"""Expert-parallel MoE dispatch and combine over torch.distributed all-to-all.

Legend: T tokens on this rank, K experts per token, H hidden, E experts, N ranks,
S rows this rank sends (one per token and destination rank), R rows it receives,
P (row, expert) pairs it computes, W = H + 2K the width of a sent row.

Each MoE layer, on every rank (ranks with T = 0 too: all ranks must meet at each
collective):
1. for each token, the set of ranks owning any of its K experts; one row per (token,
   destination rank), however many of the token's experts that rank owns. A token whose
   experts 3 and 5 both live on rank 1 crosses the wire once, not twice;
2. all-to-all the row and pair counts ([N, 2] ints, read on the host as split sizes);
3. all-to-all the rows: the token's hidden state with, appended, the K local expert ids
   (-1 where the expert is elsewhere) and K router weights, in the activation dtype
   (ids < 256 are exact even in bf16, and MoE already casts the weights to it);
4. the owner expands each row into its (row, expert) pairs, runs `experts.forward_pairs`
   (weighted, as the local path does) and sums them per row;
5. all-to-all the per-row sums back along the reversed splits;
6. sum each token's returned rows (index_add).
Bytes per layer: S_remote x W out and R_remote x H back, never more than a per-pair
dispatch's 2 x remote pairs x H (up to the 2K extra columns) and less whenever a rank
owns several of a token's experts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from gptoss_ray.parallel.placement import ExpertPlacement


@dataclass
class DispatchStats:
    """All-to-all cost accumulated on one rank since the last `reset()`."""

    all_to_all_s: float = 0.0  # seconds inside the collectives (wall time on this rank)
    wire_bytes: int = 0  # bytes this rank sent to OTHER ranks (dispatch + combine)
    # What a per-pair dispatch would send for the same routing (the "minimum":
    # remote (token, expert) pairs x H x elem bytes, out and back).
    pair_wire_bytes: int = 0
    pairs_routed: int = 0  # (token, expert) pairs of this rank's tokens, local ones included
    layers: int = 0  # MoE layer calls accumulated

    def reset(self) -> None:
        self.all_to_all_s, self.wire_bytes, self.pair_wire_bytes = 0.0, 0, 0
        self.pairs_routed, self.layers = 0, 0


@dataclass
class ExpertParallelDispatcher:
    """Drop-in for `MoE.dispatcher`: `(x [T,H], topk_ids [T,K], topk_weights [T,K], experts) -> [T,H]`."""

    placement: ExpertPlacement  # which rank owns which experts
    rank: int  # this rank's index in `group`
    group: dist.ProcessGroup | None = None  # None = the default (world) group
    stats: DispatchStats = field(default_factory=DispatchStats)  # accumulated a2a cost

    def __post_init__(self) -> None:
        self._owned = self.placement.range(self.rank)
        # Local expert ids travel in the activation dtype: bf16 holds integers exactly up to 256.
        self._max_local_experts = max(self.placement.counts())
        self._owner: torch.Tensor | None = None  # [E] rank of each expert, on x's device
        self._first: torch.Tensor | None = None  # [N] first expert id of each rank

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 experts) -> torch.Tensor:
        hidden, top_k, world = x.shape[1], topk_ids.shape[1], self.placement.world_size
        if x.dtype == torch.bfloat16 and self._max_local_experts > 256:
            raise ValueError(f"{self._max_local_experts} experts on one rank: bf16 rows carry ids only up to 256")
        if self._owner is None or self._owner.device != x.device:
            self._owner = self.placement.owner_table(x.device)
            self._first = torch.tensor([r.start for r in self.placement.ranges()], device=x.device)
        owner = self._owner[topk_ids]  # [T, K]
        to_rank = torch.zeros(x.shape[0], world, dtype=torch.bool, device=x.device)
        to_rank.scatter_(1, owner, True)  # [T, N]: token t needs rank r

        # Counts per destination: rows, and (row, expert) pairs within them. Both directions
        # in one small all-to-all and one host read: the layer's only host sync on GPUs
        # (the nonzero calls below are told their output sizes).
        t0 = time.perf_counter()
        send_counts = torch.stack([to_rank.sum(0), torch.bincount(owner.reshape(-1), minlength=world)], 1)  # [N, 2]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = torch.stack([send_counts, recv_counts]).tolist()  # [2][N][rows, pairs]
        send_split, recv_split = [c[0] for c in send], [c[0] for c in recv]
        num_recv_pairs = sum(c[1] for c in recv)

        dest, token = torch.nonzero_static(to_rank.t(), size=sum(send_split)).unbind(1)  # [S] each, rank-major
        rows = self._pack(x, topk_ids, topk_weights, owner, dest, token)  # [S, W]
        received = rows.new_empty((sum(recv_split), rows.shape[1]))  # [R, W]
        dist.all_to_all_single(received, rows, recv_split, send_split, group=self.group)
        t1 = time.perf_counter()
        row_sums = self._compute(received, hidden, top_k, num_recv_pairs, experts)  # [R, H]
        t2 = time.perf_counter()
        returned = x.new_empty((rows.shape[0], hidden))  # [S, H]
        dist.all_to_all_single(returned, row_sums, send_split, recv_split, group=self.group)
        t3 = time.perf_counter()

        # Sums in fp32, rounded once (as local_dispatch's sum over K): in bf16, adding the
        # ranks' partial sums one by one would round at each step.
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        out.index_add_(0, token, returned.float())
        remote_pairs = sum(c[1] for c in send) - send[self.rank][1]
        self._record(t1 - t0 + t3 - t2, send_split, recv_split, rows.shape[1], hidden,
                     x.element_size(), remote_pairs, owner.numel())
        return out.to(x.dtype)

    def _pack(self, x, topk_ids, topk_weights, owner, dest, token) -> torch.Tensor:
        """Row s = [x[token[s]], K expert ids local to dest[s] (-1: elsewhere), K weights]."""
        here = owner[token] == dest[:, None]  # [S, K]: which of the token's experts dest owns
        local_ids = torch.where(here, topk_ids[token] - self._first[dest][:, None], -1)  # [S, K]
        weights = torch.where(here, topk_weights[token], 0)  # [S, K]
        return torch.cat([x[token], local_ids.to(x.dtype), weights.to(x.dtype)], dim=1)

    def _compute(self, received: torch.Tensor, hidden: int, top_k: int, num_pairs: int,
                 experts) -> torch.Tensor:
        """Run our experts on each received row's pairs; one weighted sum per row."""
        local_ids = received[:, hidden:hidden + top_k].round().long()  # [R, K]
        weights = received[:, hidden + top_k:]  # [R, K]
        row, slot = torch.nonzero_static(local_ids >= 0, size=num_pairs).unbind(1)  # [P] each
        expert_ids = local_ids[row, slot] + self._owned.start  # [P] global ids
        x = received[:, :hidden]
        pair_out = experts.forward_pairs(x[row], expert_ids, weights[row, slot])  # [P, H]
        sums = torch.zeros(received.shape[0], hidden, dtype=torch.float32, device=x.device)
        return sums.index_add_(0, row, pair_out.float()).to(x.dtype)  # [R, H]

    def _record(self, seconds: float, send_split: list[int], recv_split: list[int], width: int,
                hidden: int, elem_bytes: int, remote_pairs: int, pairs: int) -> None:
        rows_out = sum(send_split) - send_split[self.rank]
        rows_back = sum(recv_split) - recv_split[self.rank]
        self.stats.wire_bytes += (rows_out * width + rows_back * hidden) * elem_bytes
        self.stats.pair_wire_bytes += 2 * remote_pairs * hidden * elem_bytes
        self.stats.all_to_all_s += seconds
        self.stats.pairs_routed += pairs
        self.stats.layers += 1


def install_dispatcher(model, placement: ExpertPlacement, rank: int,
                       group: dist.ProcessGroup | None = None) -> ExpertParallelDispatcher:
    """Point every MoE layer of `model` at one expert-parallel dispatcher (one object, so
    its stats add up over the layers) and return it."""
    dispatcher = ExpertParallelDispatcher(placement, rank, group)
    for moe in model.moe_layers():
        moe.dispatcher = dispatcher
    return dispatcher
