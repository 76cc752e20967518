"""Paged attention for CPU decode steps (one query per sequence), through torch's fused CPU
flash-attention kernel.

The reference's batched decode (attention._decode_batched) upcasts the gathered keys and
values to float32, permutes them for two einsums and concatenates the sinks: about 25 ops
and three [B, S, Hkv, D] copies per layer, 1.2 ms of a 16-sequence step per layer on two
cores. Here the G query heads that share a kv head are G queries of one (sequence, kv head)
pair, so the keys and values are read in place, in the cache's dtype, by one
`_scaled_dot_product_flash_attention_for_cpu` call (vectorized, float32 accumulation), which
also returns each row's log-sum-exp L over the visible keys. gpt-oss's sink s joins the
softmax denominator and contributes no value, so

    out_with_sink = out * e^L / (e^L + e^s) = out * sigmoid(L - s).

What a step reads (blocks, visible slots, the additive mask) depends only on the window, so
it is computed once per step per window (`memo`, the step's AttentionMetadata.schedules).
Same contract and semantics as attention.paged_attention_ref on pure decode steps.
"""

from __future__ import annotations

import torch

from gptoss_kernels.attention import decode_reads


def paged_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, sinks, sm_scale, window,
                     memo: dict | None = None) -> torch.Tensor:
    """q [B, Hq, D] (one query per sequence) -> [B, Hq, D] in q's dtype."""
    b, num_heads, d = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    key = ("cpu_decode", window, q.dtype)
    reads = memo.get(key) if memo is not None else None
    if reads is None:
        tables, visible = decode_reads(block_tables, context_lens, k_cache.shape[1], window)
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
        hidden = (~visible).flatten().nonzero().flatten()  # [B*S] rows of the unread slots
        reads = (tables, hidden, mask[:, None, None, :])  # mask [B, 1, 1, S]: every head, every query
        if memo is not None:
            memo[key] = reads
    tables, hidden, mask = reads
    # A NaN in an unread slot must not leak: the kernel adds the mask to q.k (NaN + -inf is NaN)
    # and weighs values by 0 (0 * NaN is NaN), so unread keys and values are zeroed in the copy.
    keys = k_cache[tables].flatten(1, 2)  # [B, S, Hkv, D]
    vals = v_cache[tables].flatten(1, 2)
    keys.view(-1, num_kv_heads * d).index_fill_(0, hidden, 0.0)
    vals.view(-1, num_kv_heads * d).index_fill_(0, hidden, 0.0)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.view(b, num_kv_heads, group, d), keys.transpose(1, 2), vals.transpose(1, 2), 0.0, False,
        attn_mask=mask, scale=sm_scale,
    )  # out [B, Hkv, G, D], lse [B, Hkv, G] float32
    keep = torch.sigmoid(lse - sinks.float().view(num_kv_heads, group))  # [B, Hkv, G]
    return (out * keep[..., None]).reshape(b, num_heads, d).to(q.dtype)
