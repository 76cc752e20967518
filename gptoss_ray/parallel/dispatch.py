"""Expert-parallel MoE dispatch and combine over torch.distributed all-to-all.

Legend: T tokens on this rank, K experts per token, P = T*K (token, expert) pairs sent,
R pairs received, H hidden, E experts, E_r experts owned by rank r, N ranks.

Each MoE layer, on every rank (ranks with T = 0 too: all ranks must meet at each
collective):
1. sort this rank's P pairs by global expert id; since experts are placed in contiguous
   ranges (placement.py), that also groups them by owner rank;
2. all-to-all the per-expert pair counts: rank r receives, from each source, the counts
   for its own E_r experts, which tells it both how many rows arrive and which expert
   each row is for (so no expert ids travel);
3. all-to-all the hidden rows with those split sizes;
4. run the owned experts on the received rows (`experts.forward_pairs`, weight 1);
5. all-to-all the outputs back along the reversed splits;
6. weight each returned row by its router weight and sum per token (index_add).
The router weight is applied by the sender in step 6 rather than by the expert owner,
so it never crosses the wire: three collectives per layer instead of four.
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
    min_wire_bytes: int = 0  # lower bound: pairs whose expert is not local x H x 2 directions x elem bytes
    pairs_sent: int = 0  # (token, expert) pairs routed, local ones included
    layers: int = 0  # MoE layer calls accumulated

    def reset(self) -> None:
        self.all_to_all_s, self.wire_bytes, self.min_wire_bytes = 0.0, 0, 0
        self.pairs_sent, self.layers = 0, 0


@dataclass
class ExpertParallelDispatcher:
    """Drop-in for `MoE.dispatcher`: `(x [T,H], topk_ids [T,K], topk_weights [T,K], experts) -> [T,H]`."""

    placement: ExpertPlacement  # which rank owns which experts
    rank: int  # this rank's index in `group`
    group: dist.ProcessGroup | None = None  # None = the default (world) group
    stats: DispatchStats = field(default_factory=DispatchStats)  # accumulated a2a cost

    def __post_init__(self) -> None:
        self._owned = self.placement.range(self.rank)
        self._counts_per_rank = self.placement.counts()  # [N] experts owned per rank

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 experts) -> torch.Tensor:
        num_tokens, k = topk_ids.shape
        hidden = x.shape[1]
        device = x.device
        flat_ids = topk_ids.reshape(-1)  # [P] global expert ids
        order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert, hence by owner
        pair_token = order // k  # [P] token of each sorted pair
        pair_weight = topk_weights.reshape(-1)[order]  # [P]

        send_counts = torch.bincount(flat_ids, minlength=self.placement.num_experts)  # [E]
        recv_counts = torch.empty(self.placement.world_size * len(self._owned),
                                  dtype=send_counts.dtype, device=device)  # [N * E_rank]
        t0 = time.perf_counter()
        self._all_to_all(recv_counts, send_counts,
                         [len(self._owned)] * self.placement.world_size, self._counts_per_rank)
        send_split, recv_split, recv_expert_ids = self._splits(send_counts, recv_counts, device)

        recv_x = x.new_empty((sum(recv_split), hidden))  # [R, H]
        self._all_to_all(recv_x, x[pair_token], recv_split, send_split)
        t1 = time.perf_counter()
        ones = torch.ones(recv_x.shape[0], dtype=pair_weight.dtype, device=device)
        expert_out = experts.forward_pairs(recv_x, recv_expert_ids, ones)  # [R, H]
        t2 = time.perf_counter()
        returned = x.new_empty((num_tokens * k, hidden))  # [P, H], in sorted-pair order
        self._all_to_all(returned, expert_out.to(x.dtype).contiguous(), send_split, recv_split)
        t3 = time.perf_counter()

        out = torch.zeros_like(x)  # [T, H]
        out.index_add_(0, pair_token, returned * pair_weight.to(x.dtype)[:, None])
        self._record(t1 - t0 + t3 - t2, send_split, recv_split, hidden, x.element_size(), num_tokens * k)
        return out

    def _splits(self, send_counts: torch.Tensor, recv_counts: torch.Tensor, device):
        """Per-rank row counts both ways, and the expert id of each received row."""
        # The one host sync per layer (split sizes must be Python ints): both at once.
        both = torch.cat([send_counts, recv_counts]).tolist()
        per_expert, received = both[: send_counts.numel()], both[send_counts.numel():]
        send_split, start = [], 0
        for n in self._counts_per_rank:
            send_split.append(sum(per_expert[start:start + n]))
            start += n
        owned = len(self._owned)
        recv_split = [sum(received[r * owned:(r + 1) * owned]) for r in range(self.placement.world_size)]
        # Rows from each source arrive sorted by expert: repeat our ids by their counts.
        ids = torch.arange(self._owned.start, self._owned.stop, device=device)
        recv_expert_ids = torch.repeat_interleave(
            ids.repeat(self.placement.world_size), recv_counts, output_size=sum(recv_split)
        )  # [R]
        return send_split, recv_split, recv_expert_ids

    def _all_to_all(self, output: torch.Tensor, input: torch.Tensor,
                    output_split: list[int], input_split: list[int]) -> None:
        dist.all_to_all_single(output, input, output_split, input_split, group=self.group)

    def _record(self, seconds: float, send_split: list[int], recv_split: list[int],
                hidden: int, elem_bytes: int, pairs: int) -> None:
        remote_sent = sum(send_split) - send_split[self.rank]
        remote_recv = sum(recv_split) - recv_split[self.rank]
        row = hidden * elem_bytes
        # Dispatch sends remote_sent rows; combine sends back remote_recv rows.
        self.stats.wire_bytes += (remote_sent + remote_recv) * row
        # Per pair routed off-rank, one row must go out and one come back: the minimum.
        self.stats.min_wire_bytes += 2 * remote_sent * row
        self.stats.all_to_all_s += seconds
        self.stats.pairs_sent += pairs
        self.stats.layers += 1


def install_dispatcher(model, placement: ExpertPlacement, rank: int,
                       group: dist.ProcessGroup | None = None) -> DispatchStats:
    """Point every MoE layer of `model` at one expert-parallel dispatcher; return its stats."""
    dispatcher = ExpertParallelDispatcher(placement, rank, group)
    for moe in model.moe_layers():
        moe.dispatcher = dispatcher
    return dispatcher.stats
