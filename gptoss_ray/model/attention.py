"""Attention over a paged KV cache: GQA with q/k/v/o biases, per-head sinks, and a
sliding window on alternate layers.

Legend: T tokens of the step (all sequences packed), B sequences, H hidden, Hq / Hkv
query and kv heads, D head dim, NB blocks, BS tokens per block, MB blocks per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gptoss_kernels.ops import paged_attention, store_kv
from gptoss_ray.config import LAYER_TYPES, SLIDING_ATTENTION, ModelConfig
from gptoss_ray.model.linear import Linear
from gptoss_ray.model.rope import rotate



@dataclass
class AttentionMetadata:
    """Where each token of a packed step reads and writes KV. Built by the worker once per
    step and shared by all layers; each layer picks the entries of its layer type."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32: seq b's new tokens are rows cu[b]:cu[b+1]
    context_lens: torch.Tensor  # [B] int32: KV length of seq b after this step (cached + new)
    slot_mapping: dict[str, torch.Tensor]  # layer type -> [T] int64 flat slot to write; -1 = skip
    block_tables: dict[str, torch.Tensor]  # layer type -> [B, MB] int32 physical block ids; -1 = none
    # True when no slot is -1 (decode steps: a sequence's current block always exists), so
    # the KV write needs no mask: no data-dependent shape, nothing to sync on in a CUDA graph.
    all_slots_valid: bool = False
    # [T] int64, 1 = a real token, 0 = a padding row of the static decode step (counted in no
    # metric); None = every token is real.
    valid_tokens: torch.Tensor | None = None
    # Derived once per step by the first layer that needs it (the Triton attention's tile
    # schedule depends only on cu_seqlens_q); the other layers reuse it.
    schedules: dict = field(default_factory=dict)


def allocate_kv_cache(
    config: ModelConfig, num_blocks: dict[str, int], block_size: int, dtype: torch.dtype, device="cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k, v) pair [NB, BS, Hkv, D] per layer, NB from that layer type's pool size."""
    caches = []
    for layer_type in config.layer_types:
        shape = (num_blocks[layer_type], block_size, config.num_key_value_heads, config.head_dim)
        caches.append((torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)))
    return caches


def contiguous_metadata(
    seq_lens_q: list[int], context_lens: list[int], block_size: int, max_blocks: int, device="cpu"
) -> AttentionMetadata:
    """Metadata for the simple layout where sequence b owns blocks b*MB .. (b+1)*MB - 1
    of every layer's cache: for tests and single-request callers."""
    slots, tables = [], []
    for b, (n_q, ctx) in enumerate(zip(seq_lens_q, context_lens)):
        slots.extend(b * max_blocks * block_size + p for p in range(ctx - n_q, ctx))
        tables.append([b * max_blocks + i for i in range(max_blocks)])
    cu = torch.tensor([0] + seq_lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    slot = torch.tensor(slots, dtype=torch.int64, device=device)
    table = torch.tensor(tables, dtype=torch.int32, device=device).reshape(len(seq_lens_q), max_blocks)
    return AttentionMetadata(
        cu_seqlens_q=cu.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        slot_mapping={t: slot for t in LAYER_TYPES},
        block_tables={t: table for t in LAYER_TYPES},
    )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_type: str, dtype: torch.dtype, device):
        super().__init__()
        c = config
        self.layer_type = layer_type
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.window = c.sliding_window if layer_type == SLIDING_ATTENTION else None
        self.sm_scale = c.head_dim**-0.5
        kw = dict(bias=c.attention_bias, dtype=dtype, device=device)
        # q, k and v as one GEMM: the checkpoint's q_proj / k_proj / v_proj are row ranges of
        # qkv_proj (see `qkv_rows`; the loader copies each into its range).
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(c.hidden_size, q_dim + 2 * kv_dim, **kw)
        self.o_proj = Linear(q_dim, c.hidden_size, **kw)
        self.sinks = nn.Parameter(torch.empty(self.num_heads, dtype=dtype, device=device))
        self.register_buffer("sinks_f32", torch.empty(self.num_heads, dtype=torch.float32, device=device),
                             persistent=False)  # the kernels' dtype; refreshed by `finish_loading`

    def qkv_rows(self, proj: str) -> tuple[int, int]:
        """(first row, rows) of checkpoint tensor `proj` (q_proj, k_proj, v_proj) in qkv_proj."""
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (0, q_dim), "k_proj": (q_dim, kv_dim), "v_proj": (q_dim + kv_dim, kv_dim)}[proj]

    def finish_loading(self) -> None:
        self.sinks_f32.copy_(self.sinks.detach().float())

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x [T, H], rope: the step's (cos, sin) rows from RotaryEmbedding.lookup -> [T, H]."""
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hkv) D]
        qk = rotate(qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d), *rope)  # q and k heads rotated together
        q, k = qk[:, :hq], qk[:, hq:]  # [T, Hq, D], [T, Hkv, D]
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        k_cache, v_cache = kv_cache
        store_kv(k, v, k_cache, v_cache, attn.slot_mapping[self.layer_type], skip_negative=not attn.all_slots_valid)
        out = paged_attention(
            q, k_cache, v_cache, attn.block_tables[self.layer_type], attn.cu_seqlens_q, attn.context_lens,
            self.sinks_f32, self.sm_scale, self.window, schedules=attn.schedules,
        )
        return self.o_proj(out.reshape(t, hq * d))
