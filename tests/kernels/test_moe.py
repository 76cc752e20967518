"""The Triton MoE kernels against moe_experts_ref, on CPU through Triton's interpreter
(on a GPU the same tests run the compiled kernels)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before the kernels are defined (triton.jit reads it at decoration).
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from gptoss_kernels.moe import ExpertWeights, moe_experts_ref  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from gptoss_kernels.moe_triton import _fp4_e2m1_times2, moe_experts_triton  # noqa: E402
from gptoss_kernels.mxfp4 import FP4_VALUES, dequantize_mxfp4, quantize_mxfp4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The sigmoid of a very negative gate overflows exp() in the interpreter's numpy: harmless (-> 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@triton.jit
def _decode_all_codes(out_ptr):
    codes = tl.arange(0, 16)
    tl.store(out_ptr + codes, _fp4_e2m1_times2(codes) * 0.5)


def test_fp4_decode_matches_the_e2m1_table_exactly():
    out = torch.full((16,), float("nan"), device=DEVICE)
    _decode_all_codes[(1,)](out)
    assert out.tolist() == list(FP4_VALUES)
    assert torch.signbit(out[8])  # code 8 is -0.0


def make_experts(num_experts, hidden, inter, dtype, quantized, gen, weight_std=0.05) -> ExpertWeights:
    """Random experts; MXFP4 ones go through quantize_mxfp4, so scales vary per 32-block."""
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * weight_std
    down = torch.randn(num_experts, hidden, inter, generator=gen) * weight_std
    w = ExpertWeights(
        gate_up_bias=(torch.randn(num_experts, 2 * inter, generator=gen) * 0.5).to(dtype),
        down_bias=(torch.randn(num_experts, hidden, generator=gen) * 0.5).to(dtype),
    )
    if quantized:
        w.gate_up_blocks, w.gate_up_scales = quantize_mxfp4(gate_up)
        w.down_blocks, w.down_scales = quantize_mxfp4(down)
    else:
        w.gate_up_weight, w.down_weight = gate_up.to(dtype), down.to(dtype)
    return to_device(w)


def to_device(w: ExpertWeights) -> ExpertWeights:
    fields = {k: (v.to(DEVICE) if v is not None else None) for k, v in vars(w).items()}
    return ExpertWeights(**fields)


def as_float32(w: ExpertWeights) -> ExpertWeights:
    fields = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in vars(w).items()}
    return ExpertWeights(**fields)


def check(x, ids, weights, w, dtype, **kw):
    out = moe_experts_triton(x, ids, weights, w, **kw)
    assert out.shape == x.shape and out.dtype == x.dtype
    if dtype == torch.float32:
        ref = moe_experts_ref(x, ids, weights, w, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:
        # bf16: compare with the float32 reference; the bf16 reference rounds in other places.
        ref = moe_experts_ref(x.float(), ids, weights.float(), as_float32(w), **kw)
        torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized", [True, False], ids=["mxfp4", "dense"])
def test_ragged_loads_with_an_empty_expert(dtype, quantized):
    """37 pairs over 5 experts, loads 0..20 (expert 2 gets none); I=96 is not a multiple of
    the 64-wide tiles, so column and depth masks are exercised too."""
    gen = torch.Generator().manual_seed(0)
    num_experts, hidden, inter = 5, 64, 96
    w = make_experts(num_experts, hidden, inter, dtype, quantized, gen)
    ids = torch.tensor([0] * 3 + [1] * 20 + [3] * 13 + [4] * 1)[torch.randperm(37, generator=gen)]
    x = torch.randn(37, hidden, generator=gen).to(dtype)
    weights = torch.rand(37, generator=gen)
    check(x.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE), w, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_pair(dtype):
    gen = torch.Generator().manual_seed(1)
    w = make_experts(4, 64, 64, dtype, True, gen)
    x = torch.randn(1, 64, generator=gen).to(dtype)
    check(x.to(DEVICE), torch.tensor([3], device=DEVICE), torch.tensor([0.7], device=DEVICE), w, dtype)


def test_no_pairs_gives_empty_output():
    w = make_experts(2, 64, 64, torch.float32, True, torch.Generator().manual_seed(2))
    out = moe_experts_triton(torch.empty(0, 64, device=DEVICE), torch.empty(0, dtype=torch.int64, device=DEVICE),
                             torch.empty(0, device=DEVICE), w)
    assert out.shape == (0, 64)


def test_clamped_swiglu_with_custom_alpha_and_limit():
    """Large activations push gate and up past the limit, so both clamps matter; alpha and
    limit are passed through rather than the gpt-oss defaults."""
    gen = torch.Generator().manual_seed(3)
    w = make_experts(3, 64, 64, torch.float32, True, gen, weight_std=0.5)
    x = torch.randn(20, 64, generator=gen) * 4
    ids = torch.randint(0, 3, (20,), generator=gen)
    pre = torch.stack([x[n] @ dequantize_mxfp4(w.gate_up_blocks[ids[n]], w.gate_up_scales[ids[n]]).T
                       for n in range(20)]) + w.gate_up_bias[ids]
    assert (pre[:, 0::2] > 3.0).any() and (pre[:, 1::2].abs() > 3.0).any()  # the clamps bite
    kw = dict(alpha=1.0, limit=3.0)
    out = check(x.to(DEVICE), ids.to(DEVICE), torch.rand(20, generator=gen).to(DEVICE), w, torch.float32, **kw)
    default = moe_experts_ref(x.to(DEVICE), ids.to(DEVICE), torch.ones(20, device=DEVICE), w)
    assert not torch.allclose(out, default)  # the custom values changed the result


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 200])
def test_gpt_oss_shapes_on_gpu(dtype, tokens):
    """gpt-oss-20b's expert shapes (32 experts, H = I = 2880: not a multiple of the 64-deep
    K tiles) through the compiled kernels, decode and prefill sized."""
    gen = torch.Generator().manual_seed(5)
    num_experts, hidden = 32, 2880
    u8 = dict(dtype=torch.uint8, generator=gen)
    w = to_device(ExpertWeights(  # random codes (quantize_mxfp4 on 800M weights would be slow)
        gate_up_bias=torch.randn(num_experts, 2 * hidden, generator=gen).to(dtype),
        down_bias=torch.randn(num_experts, hidden, generator=gen).to(dtype),
        gate_up_blocks=torch.randint(0, 256, (num_experts, 2 * hidden, hidden // 32, 16), **u8),
        gate_up_scales=torch.randint(118, 124, (num_experts, 2 * hidden, hidden // 32), **u8),
        down_blocks=torch.randint(0, 256, (num_experts, hidden, hidden // 32, 16), **u8),
        down_scales=torch.randint(118, 124, (num_experts, hidden, hidden // 32), **u8),
    ))
    ids = torch.topk(torch.randn(tokens, num_experts, generator=gen), 4).indices.reshape(-1)
    x = torch.randn(4 * tokens, hidden, generator=gen).to(dtype)
    check(x.to(DEVICE), ids.to(DEVICE), torch.rand(4 * tokens, generator=gen).to(DEVICE), w, dtype)
