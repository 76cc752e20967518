"""Expert-parallel dispatch with real gloo process groups (torch.multiprocessing, no Ray).

Four processes each load the tiny-moe checkpoint (15 experts: divisible by none of 2, 3,
4) twice: whole, as the single-process reference, and with only their own experts. The
same processes then form groups of 2, 3 and 4 ranks, and every rank's MoE output through
the all-to-all dispatcher must equal the whole model's local MoE on the same tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptoss_ray.config import PRESETS
from gptoss_ray.model.attention import allocate_kv_cache, contiguous_metadata
from gptoss_ray.model.loader import load_model
from gptoss_ray.parallel.dispatch import ExpertParallelDispatcher
from gptoss_ray.parallel.placement import ExpertPlacement

CONFIG = PRESETS["tiny-moe"]
WORLD = 4
# Tokens per rank in each group: uneven, and one rank with none (it must still take part).
TOKENS = {2: [7, 0], 3: [5, 0, 9], 4: [3, 11, 0, 6]}


def test_placement_is_contiguous_and_uneven():
    assert ExpertPlacement(128, 3).counts() == [43, 43, 42]
    assert ExpertPlacement(15, 4).ranges() == [range(0, 4), range(4, 8), range(8, 12), range(12, 15)]
    owner = ExpertPlacement(15, 4).owner_table()
    assert owner.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 3
    assert ExpertPlacement(15, 4).owner_of(11) == 2
    with pytest.raises(ValueError):
        ExpertPlacement(4, 5)


def _moe_matches(rank: int, size: int, group, full, ckpt) -> None:
    placement = ExpertPlacement(CONFIG.num_local_experts, size)
    part = load_model(ckpt, experts=placement.range(rank))
    gen = torch.Generator().manual_seed(100 * size + rank)
    tokens = TOKENS[size][rank]
    for full_moe, part_moe in zip(full.moe_layers(), part.moe_layers()):
        dispatcher = ExpertParallelDispatcher(placement, rank, group)
        part_moe.dispatcher = dispatcher
        x = torch.randn(tokens, CONFIG.hidden_size, generator=gen)  # [T, H]
        with torch.inference_mode():
            got = part_moe(x)
            # (the local reference cannot take zero tokens; zero tokens give zero rows)
            expected = full_moe(x) if tokens else torch.zeros_like(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # The recorded bytes match an independent count: one row per (token, remote rank)
        # out (hidden + K ids + K weights) and back (hidden), against two rows per remote pair.
        _, topk_ids = torch.topk(full_moe.router(x), CONFIG.num_experts_per_tok, dim=-1)
        owner = placement.owner_table()[topk_ids]  # [T, K]
        remote_pairs = int((owner != rank).sum())
        remote_rows = sum(len(set(row) - {rank}) for row in owner.tolist())
        h, k = CONFIG.hidden_size, CONFIG.num_experts_per_tok
        assert dispatcher.stats.pair_wire_bytes == 2 * remote_pairs * h * 4
        # Every row sent out comes back as one hidden row: summed over the group, the bytes
        # on the wire are remote rows x (out width + back width).
        totals = torch.tensor([dispatcher.stats.wire_bytes, remote_rows])
        dist.all_reduce(totals, group=group)
        assert totals[0] == totals[1] * ((h + 2 * k) + h) * 4
        assert remote_rows <= remote_pairs
        assert dispatcher.stats.layers == 1 and dispatcher.stats.all_to_all_s > 0


def _forward_matches(rank: int, group, full, ckpt) -> None:
    """The whole model, attention included, with two sequences on this rank."""
    placement = ExpertPlacement(CONFIG.num_local_experts, WORLD)
    part = load_model(ckpt, experts=placement.range(rank))
    for moe in part.moe_layers():
        moe.dispatcher = ExpertParallelDispatcher(placement, rank, group)
    lens = [2 + rank, 5]
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, 1000, (sum(lens),), generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    meta = contiguous_metadata(lens, lens, block_size=4, max_blocks=2)
    blocks = {t: 4 for t in meta.slot_mapping}
    outs = []
    for model in (full, part):
        caches = allocate_kv_cache(CONFIG, blocks, 4, torch.float32)
        outs.append(model(ids, positions, meta, caches))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def _rank_main(rank: int, port: int, ckpt: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, WORLD, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    # new_group is collective: every process creates every subgroup, in the same order.
    groups = {size: dist.new_group(list(range(size))) for size in (2, 3)}
    groups[WORLD] = dist.group.WORLD
    full = load_model(ckpt)
    try:
        for size in (2, 3, 4):
            if rank < size:
                _moe_matches(rank, size, groups[size], full, ckpt)
            dist.barrier()
        _forward_matches(rank, dist.group.WORLD, full, ckpt)
    finally:
        dist.destroy_process_group()


def test_dispatch_matches_single_process_moe(tiny_moe_ckpt):
    ckpt = tiny_moe_ckpt
    # Rank 0's store would do, but the parent holding it keeps the children symmetric.
    store = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    mp.spawn(_rank_main, args=(store.port, str(ckpt)), nprocs=WORLD, join=True)
