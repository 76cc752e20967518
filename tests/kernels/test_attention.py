"""The Triton paged attention kernel against paged_attention_ref, on CPU through Triton's
interpreter (on a GPU the same tests run the compiled kernel).

Cache slots no query may read (before a window's start, after a context's end, and the
blocks that the table marks -1) are filled with NaN: a kernel that loads one of them and
"masks it away" afterwards still turns the output NaN, so these tests catch stray reads."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are defined (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from gptoss_kernels.attention import paged_attention_ref  # noqa: E402
from gptoss_kernels.attention_triton import paged_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(q_lens, ctx_lens, *, num_q_heads, num_kv_heads, head_dim, block_size, window, dtype, gen):
    """Random q and a shuffled paged cache; unreadable slots poisoned with NaN, wholly
    out-of-window blocks -1 in the table (as the engine's recycled sliding blocks)."""
    max_blocks = max(-(-c // block_size) for c in ctx_lens)
    num_blocks = len(q_lens) * max_blocks + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    table = torch.randperm(num_blocks, generator=gen)[: len(q_lens) * max_blocks].view(len(q_lens), max_blocks)
    table = table.to(torch.int32)
    for b, (n_q, ctx) in enumerate(zip(q_lens, ctx_lens)):
        first_key = 0 if window is None else max(0, ctx - n_q - window + 1)
        for pos in range(first_key, ctx):
            blk = table[b, pos // block_size]
            k_cache[blk, pos % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
            v_cache[blk, pos % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen)
        table[b, : first_key // block_size] = -1
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen)
    cu = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    args = (
        q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), table, cu, torch.tensor(ctx_lens, dtype=torch.int32)
    )
    return tuple(a.to(DEVICE) for a in args)


def check(q_lens, ctx_lens, *, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4, window=None,
          sink_mean=0.0, dtype=torch.float32, seed=0, num_splits=None):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(q_lens, ctx_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       block_size=block_size, window=window, dtype=dtype, gen=gen)
    sinks = (torch.randn(num_q_heads, generator=gen) + sink_mean).to(DEVICE)
    args = (*batch, sinks, head_dim**-0.5, window)
    out = paged_attention_triton(*args, num_splits=num_splits)
    ref = paged_attention_ref(*args)
    assert out.dtype == dtype and not out.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * ref.float().abs().max().item())
    return out, ref


def test_prefill_crossing_block_boundaries():
    """Three sequences: a chunked prefill (queries are the tail of the context), one token
    onto a long cache, and a whole prompt; contexts end mid-block."""
    check([5, 1, 9], [13, 7, 9])


def test_decode_batch_with_contexts_longer_than_one_key_tile():
    check([1, 1, 1], [1, 70, 30], block_size=16)


def test_single_token():
    check([1], [1])


def test_empty_sequence_in_batch():
    check([3, 0, 2], [3, 5, 6])


@pytest.mark.parametrize("ctx_lens", [[12, 13], [9, 30]], ids=["window-on-block-edge", "window-mid-block"])
def test_sliding_window_cut_at_its_edge(ctx_lens):
    """window 4, block size 4: the first visible key starts a block (12-1-4+1 = 8) or sits
    inside one; earlier blocks are -1 in the table and NaN in the cache."""
    check([1, 7], ctx_lens, window=4)


def test_window_wider_than_context_is_full_attention():
    out, _ = check([6], [6], window=64)
    full = check([6], [6])[0]
    torch.testing.assert_close(out, full)


def test_gqa_group_not_a_power_of_two_and_small_head_dim():
    """tiny-odd's shape: 6 query heads on 2 kv heads (groups of 3 padded to 4), head dim 8."""
    check([5, 1, 20], [13, 40, 30], num_q_heads=6, num_kv_heads=2, head_dim=8, window=8)


@pytest.mark.parametrize("sink_mean", [12.0, -12.0], ids=["large-sinks", "small-sinks"])
def test_sinks_large_and_small(sink_mean):
    """Large sinks take nearly all the mass (outputs shrink ~e^-12 but must still match to
    1e-5 of their own size); small ones leave plain softmax attention."""
    out, ref = check([4, 1], [4, 9], sink_mean=sink_mean, seed=3)
    if sink_mean > 0:
        assert ref.abs().max() < 1e-3


def test_sink_takes_mass():
    """Raising every sink by 5 shrinks every output (the sink adds no value, only denominator)."""
    gen = torch.Generator().manual_seed(4)
    batch = make_batch([3], [7], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4, window=None,
                       dtype=torch.float32, gen=gen)
    sinks = torch.zeros(4, device=DEVICE)
    low = paged_attention_triton(*batch, sinks, 0.25)
    high = paged_attention_triton(*batch, sinks + 5.0, 0.25)
    assert (high.abs() < low.abs()).all()


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("window", [None, 8])
def test_split_keys_flash_decoding(num_splits, window):
    """Keys split across programs and merged by the combine kernel (chosen automatically when
    a decode batch cannot fill the GPU): more splits than a short context has key tiles leaves
    some splits empty; the sinks and the window must survive the merge."""
    check([1, 1, 3], [150, 7, 70], window=window, num_splits=num_splits, sink_mean=1.0, seed=7)


@pytest.mark.parametrize("window", [None, 8])
def test_bfloat16(window):
    check([5, 1, 20], [13, 40, 30], window=window, dtype=torch.bfloat16, seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 128])
def test_gpt_oss_shapes_on_gpu(dtype, window):
    """64 query / 8 kv heads, head dim 64, 16-token blocks; decodes beside a chunked prefill."""
    check([1, 1, 300, 1], [1, 700, 500, 129], num_q_heads=64, num_kv_heads=8, head_dim=64, block_size=16,
          window=window, dtype=dtype, seed=6)
