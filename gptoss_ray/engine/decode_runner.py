"""The static decode step: fixed-shape buffers, batch sizes padded to buckets, and on CUDA
one CUDA graph per bucket (vLLM's CUDAGraphRunner, nano-vllm's `capture_cudagraph`).

A pure-decode step (every sequence computes exactly one token) has the same shape every
time except for its batch size B. The runner keeps persistent device buffers sized to
max_num_seqs (input ids, positions, block-table rows), copies a step's B rows in, and pads
up to the next bucket with rows that:
  - read the block-table row `scratch_row` (one row past the real ones), whose first entry
    is one scratch block per KV pool that the KV manager never hands out, at position 0:
    their KV write lands in the scratch block's slot 0, never in a live slot;
  - are cut off before the sampler (the worker samples `hidden[:B]`);
  - count nothing in the expert-load metric (`AttentionMetadata.valid_tokens`).
Everything else (slot mapping, per-step block tables, context lengths) is derived from
those buffers on the device, inside the graph, so a replay needs one host-to-device copy.

Prefill and mixed prefill/decode steps, and decode steps larger than the largest bucket,
run eagerly through the worker's own metadata path. On CPU there are no graphs: the runner
is off by default there (the eager path is unchanged) and can be forced on to exercise the
same buffers, padding and scratch slots (EngineConfig.static_decode / GPTOSS_STATIC_DECODE=1).

Legend: R = max_num_seqs, MB blocks per sequence, P padded batch (a bucket), H hidden.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)


def default_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 (vLLM's default capture sizes), capped at max_num_seqs, which is always one."""
    sizes = [s for s in [1, 2, 4, 8, *range(16, max_num_seqs + 1, 8)] if s <= max_num_seqs]
    return sorted(set(sizes) | {max_num_seqs})


class DecodeRunner:
    def __init__(self, model, kv_caches, block_tables: dict[str, torch.Tensor], scratch_row: int, block_size: int,
                 buckets: list[int], device: torch.device):
        """block_tables: the worker's [R + 1, MB] tables; row `scratch_row` (= R) holds each
        pool's scratch block in column 0, -1 elsewhere."""
        self.model, self.kv_caches, self.block_tables = model, kv_caches, block_tables
        self.scratch_row, self.block_size, self.device = scratch_row, block_size, device
        self.buckets = sorted(buckets)
        largest = self.buckets[-1]
        # the step's inputs: [0] token ids, [1] positions, [2] block-table rows; one copy per step
        self.inputs = torch.zeros(3, largest, dtype=torch.int64, device=device)
        self.host = torch.zeros(3, largest, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.cu_seqlens = torch.arange(largest + 1, dtype=torch.int32, device=device)  # one query per row
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> the graph's [P, H] output
        self.capture_s, self.graph_memory_bytes = 0.0, 0  # set by capture()

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest bucket holding num_seqs rows; None = larger than any (run eager)."""
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    def _forward(self, padded: int) -> torch.Tensor:
        """The model on the first `padded` rows of the buffers -> [P, H]. No host syncs: everything
        below is a device op on fixed shapes, so it can be captured."""
        from gptoss_ray.model.attention import AttentionMetadata

        ids, positions, rows = self.inputs[0, :padded], self.inputs[1, :padded], self.inputs[2, :padded]
        cols, offsets = positions // self.block_size, positions % self.block_size
        tables = {kind: table[rows] for kind, table in self.block_tables.items()}  # [P, MB]
        slots = {kind: table[rows, cols].long() * self.block_size + offsets for kind, table in self.block_tables.items()}
        attn = AttentionMetadata(
            cu_seqlens_q=self.cu_seqlens[: padded + 1], context_lens=(positions + 1).to(torch.int32),
            slot_mapping=slots, block_tables=tables, all_slots_valid=True,
            valid_tokens=(rows != self.scratch_row).long(),
        )
        return self.model(ids, positions, attn, self.kv_caches)

    def run(self, input_ids: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """One pure-decode step of B = len(input_ids) sequences (B <= the largest bucket):
        hidden states [B, H] of the real rows only."""
        n = len(input_ids)
        padded = self.bucket(n)
        host = self.host
        # one numpy write of the three rows (torch.tensor from lists costs several times more)
        host.numpy()[:, :n] = np.array((input_ids, positions, rows), dtype=np.int64)
        host[0, n:padded] = 0  # padding: token 0 at position 0 of the scratch row
        host[1, n:padded] = 0
        host[2, n:padded] = self.scratch_row
        self.inputs[:, :padded].copy_(host[:, :padded], non_blocking=True)
        graph = self.graphs.get(padded)
        if graph is None:
            return self._forward(padded)[:n]
        graph.replay()
        return self.outputs[padded][:n]

    # --- CUDA graphs --------------------------------------------------------------------------------

    def capture(self) -> None:
        """One graph per bucket, largest first (the smaller ones then fit in its memory pool,
        shared by all: only one replays at a time). Run after the KV cache is allocated."""
        assert self.device.type == "cuda"
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(self.device)[0]
        self.host.zero_()
        self.host[2] = self.scratch_row  # capture on padding rows only: no live KV slot is written
        self.inputs.copy_(self.host)
        pool = None
        for padded in sorted(self.buckets, reverse=True):
            # warm-up outside the graph: Triton compiles and autotunes, allocators settle
            for _ in range(2):
                self._forward(padded)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[padded] = self._forward(padded)
            pool = graph.pool() if pool is None else pool
            self.graphs[padded] = graph
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        self.graph_memory_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        logger.info("captured %d CUDA graphs (decode batch sizes %s) in %.1f s; device memory taken: %.0f MiB",
                    len(self.graphs), self.buckets, self.capture_s, self.graph_memory_bytes / 2**20)
