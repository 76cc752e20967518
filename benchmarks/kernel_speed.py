"""Time the Triton kernels on gpt-oss shapes and put the numbers next to the device's own
measured ceilings: a large bf16 matmul (TFLOP/s) and a large device-to-device copy (GB/s).

    python benchmarks/kernel_speed.py                    # on a CUDA GPU; prints a table
    python benchmarks/kernel_speed.py --json out.json    # also write the rows
    python benchmarks/kernel_speed.py --smoke            # CPU: tiny shapes through Triton's interpreter,
                                                    # checks the script runs (timings meaningless)

Without a GPU (and without --smoke) it says so and exits 0.

Cases (one MoE layer / one attention layer of gpt-oss-120b, bf16 activations):
- moe T=n: T tokens routed top-4 over 128 MXFP4 experts, H = I = 2880. FLOPs 6*N*H*I for
  N = 4T pairs; bytes = the packed weights of the experts hit (4.25 bits/weight) + activations.
  Small T is weight-bandwidth bound (GB/s matters), large T compute bound (TFLOP/s).
- attn decode/prefill: 64 query / 8 kv heads, D 64, 16-token blocks in shuffled order; full or
  128-token window. Bytes = K and V read once per kv head; FLOPs = 4*D*Hq per visible (q, k).
The torch reference is timed where it finishes in reasonable time, for a speedup column.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Row:
    """One timed case."""

    name: str  # case label
    ms: float  # mean time of one call, milliseconds
    tflops: float  # achieved TFLOP/s
    gbps: float  # achieved GB/s (bytes the kernel must move at least once)
    ref_ms: float | None  # the torch reference's time, when measured


def timed(fn, device: str) -> float:
    """Mean milliseconds per call."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=100)
    fn()  # interpreter: one warm call, one timed
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def ceilings(device: str, size: int, copy_mib: int) -> tuple[float, float]:
    """(bf16 matmul TFLOP/s, copy GB/s counting read + write) measured on this device."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, device)
    tflops = 2 * size**3 / ms / 1e9
    src = torch.empty(copy_mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), device)
    return tflops, 2 * src.numel() / ms / 1e6


def moe_case(tokens: int, num_experts: int, hidden: int, inter: int, top_k: int, device: str, with_ref: bool):
    from gptoss_kernels.moe import ExpertWeights, moe_experts_ref
    from gptoss_kernels.moe_triton import moe_experts_triton

    gen = torch.Generator(device=device).manual_seed(0)
    u8 = dict(dtype=torch.uint8, device=device, generator=gen)
    w = ExpertWeights(
        gate_up_bias=torch.randn(num_experts, 2 * inter, device=device, dtype=torch.bfloat16),
        down_bias=torch.randn(num_experts, hidden, device=device, dtype=torch.bfloat16),
        gate_up_blocks=torch.randint(0, 256, (num_experts, 2 * inter, hidden // 32, 16), **u8),
        gate_up_scales=torch.randint(118, 124, (num_experts, 2 * inter, hidden // 32), **u8),
        down_blocks=torch.randint(0, 256, (num_experts, hidden, inter // 32, 16), **u8),
        down_scales=torch.randint(118, 124, (num_experts, hidden, inter // 32), **u8),
    )
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(tokens, num_experts, device=device, generator=gen)
    top, ids = torch.topk(logits, top_k, dim=-1)
    weights = torch.softmax(top, dim=-1).reshape(-1)
    ids = ids.reshape(-1)
    xp = x.repeat_interleave(top_k, dim=0)  # [N, H] one row per pair, as local_dispatch passes it
    pairs = xp.shape[0]
    hit = int(torch.unique(ids).numel())
    weight_bytes = hit * (3 * inter * hidden * 17 // 32 + (2 * inter + hidden) * 2)  # 4.25 bits + bf16 bias
    act_bytes = pairs * (hidden * 2 * 2 + inter * 2 * 2)  # x in, act out+in, y out (bf16)
    ms = timed(lambda: moe_experts_triton(xp, ids, weights, w), device)
    ref_ms = timed(lambda: moe_experts_ref(xp, ids, weights, w), device) if with_ref else None
    return Row(f"moe T={tokens} E={num_experts} (hit {hit})", ms, 6 * pairs * hidden * inter / ms / 1e9,
               (weight_bytes + act_bytes) / ms / 1e6, ref_ms)


def attention_case(name: str, q_lens: list[int], ctx_lens: list[int], window: int | None, heads: tuple[int, int, int],
                   block_size: int, device: str, with_ref: bool):
    from gptoss_kernels.attention import paged_attention_ref
    from gptoss_kernels.attention_triton import paged_attention_triton

    num_q_heads, num_kv_heads, head_dim = heads
    gen = torch.Generator(device=device).manual_seed(0)
    max_blocks = max(-(-c // block_size) for c in ctx_lens)
    num_blocks = max_blocks * len(ctx_lens)
    bf16 = dict(device=device, dtype=torch.bfloat16, generator=gen)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, **bf16)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, **bf16)
    table = torch.randperm(num_blocks, device=device, generator=gen).view(len(ctx_lens), max_blocks).to(torch.int32)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, **bf16)
    cu = torch.tensor([0, *q_lens], device=device).cumsum(0).to(torch.int32)
    ctx = torch.tensor(ctx_lens, device=device, dtype=torch.int32)
    sinks = torch.randn(num_q_heads, device=device, generator=gen)
    args = (q, k_cache, v_cache, table, cu, ctx, sinks, head_dim**-0.5, window)
    visible = keys_read = 0
    for n_q, c in zip(q_lens, ctx_lens):
        for i in range(c - n_q, c):
            visible += i + 1 if window is None else min(i + 1, window)
        keys_read += c if window is None else min(c, n_q + window - 1)
    ms = timed(lambda: paged_attention_triton(*args), device)
    ref_ms = timed(lambda: paged_attention_ref(*args), device) if with_ref else None
    flops = 4 * head_dim * num_q_heads * visible
    data = keys_read * num_kv_heads * head_dim * 2 * 2 + 2 * q.numel() * 2
    return Row(name, ms, flops / ms / 1e9, data / ms / 1e6, ref_ms)


def run_cases(device: str, smoke: bool) -> list[Row]:
    if smoke:  # tiny shapes the interpreter gets through in seconds
        return [
            moe_case(8, 4, 64, 64, 2, device, with_ref=True),
            attention_case("attn decode", [1, 1], [20, 9], None, (4, 2, 16), 4, device, with_ref=True),
            attention_case("attn prefill window", [12], [12], 4, (4, 2, 16), 4, device, with_ref=True),
        ]
    heads = (64, 8, 64)
    rows = [moe_case(t, 128, 2880, 2880, 4, device, with_ref=t <= 32) for t in (1, 32, 256, 2048, 8192)]
    rows.append(attention_case("attn decode B=1 ctx=32768 full (key splits)", [1], [32768], None, heads, 16, device,
                               with_ref=False))
    for window in (None, 128):
        tag = "full" if window is None else f"window {window}"
        rows.append(attention_case(f"attn decode B=64 ctx=4096 {tag}", [1] * 64, [4096] * 64, window, heads, 16,
                                   device, with_ref=True))  # the reference loops over sequences: cheap here
        rows.append(attention_case(f"attn prefill 1x4096 {tag}", [4096], [4096], window, heads, 16, device,
                                   with_ref=False))  # the reference would hold 64x4096x4096 float32 scores
        rows.append(attention_case(f"attn chunk 4x512 onto 2048 {tag}", [512] * 4, [2560] * 4, window, heads, 16,
                                   device, with_ref=False))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows and ceilings to this file")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes through Triton's interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("no CUDA GPU: nothing to benchmark (use --smoke to run tiny shapes through the interpreter)")
        return 0
    if device == "cpu":
        torch.set_num_threads(1)  # the machine's cores are shared
    peak_tflops, peak_gbps = ceilings(device, 256 if args.smoke else 8192, 4 if args.smoke else 2048)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, timings meaningless)"
    print(f"{name}: ceilings bf16 matmul {peak_tflops:.1f} TFLOP/s, copy {peak_gbps:.0f} GB/s")
    rows = run_cases(device, args.smoke)
    print(f"{'case':44} {'ms':>9} {'TFLOP/s':>8} {'%mm':>5} {'GB/s':>8} {'%copy':>6} {'ref ms':>9} {'speedup':>8}")
    for r in rows:
        ref = f"{r.ref_ms:9.3f} {r.ref_ms / r.ms:7.1f}x" if r.ref_ms is not None else f"{'-':>9} {'-':>8}"
        print(f"{r.name:44} {r.ms:9.3f} {r.tflops:8.2f} {100 * r.tflops / peak_tflops:4.0f}% {r.gbps:8.0f} "
              f"{100 * r.gbps / peak_gbps:5.0f}% {ref}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "peak_tflops": peak_tflops, "peak_gbps": peak_gbps,
                       "rows": [asdict(r) for r in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
