"""Routing helpers: top-k softmax, the stable sort of pairs by expert, and the sync-free
tile schedule the grouped kernels run over (torch only, no Triton)."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels.routing import sort_by_expert, tile_schedule, topk_softmax


def test_topk_softmax_picks_largest_and_normalises_over_k():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 9, generator=gen)
    ids, weights = topk_softmax(logits, 3)
    assert ids.dtype == torch.int64 and ids.shape == (7, 3)
    for t in range(7):
        expected = torch.argsort(logits[t], descending=True)[:3]
        assert ids[t].tolist() == expected.tolist()
        assert torch.allclose(weights[t], torch.softmax(logits[t, expected], dim=0))


def test_sort_by_expert_is_stable_with_offsets_and_empty_experts():
    ids = torch.tensor([3, 0, 3, 1, 0, 3, 1, 3])  # expert 2 and 4 receive nothing
    sort = sort_by_expert(ids, num_experts=5)
    assert sort.counts.tolist() == [2, 2, 0, 4, 0]
    assert sort.expert_offsets.tolist() == [0, 2, 4, 4, 8, 8]
    assert sort.order.tolist() == [1, 4, 3, 6, 0, 2, 5, 7]  # token order kept within an expert
    for e in range(5):
        rows = sort.order[sort.expert_offsets[e] : sort.expert_offsets[e + 1]]
        assert (ids[rows] == e).all()


@pytest.mark.parametrize("sizes,block_m", [([5, 0, 17, 1, 16], 4), ([0, 0], 16), ([33], 16), ([1] * 6, 16)])
def test_tile_schedule_covers_every_row_once_without_straddling(sizes, block_m):
    offsets = torch.tensor([0] + sizes).cumsum(0)
    num_rows = sum(sizes)
    tiles = tile_schedule(offsets, num_rows, block_m)
    assert tiles.num_tiles == num_rows // block_m + len(sizes)  # the sync-free upper bound
    seen = torch.zeros(num_rows, dtype=torch.int64)
    for g, start, end in zip(tiles.group.tolist(), tiles.row_start.tolist(), tiles.row_end.tolist()):
        if start >= end:  # padding tile
            assert g == len(sizes)
            continue
        assert end == offsets[g + 1]  # row_end is the group's end: tiles never cross groups
        assert offsets[g] <= start < end
        seen[start : min(start + block_m, end)] += 1
    assert seen.tolist() == [1] * num_rows
