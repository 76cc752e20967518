"""MXFP4 decoding against values computed by hand."""

from __future__ import annotations

import torch

from gptoss_kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4


def test_hand_built_block():
    # One group of 32 weights: bytes hold two E2M1 codes each, low nibble first.
    # codes 0x1 = 0.5, 0x2 = 1.0, 0x7 = 6.0, 0x9 = -0.5, 0xF = -6.0, 0x0 = 0, 0x8 = -0
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x21  # low 0x1 -> w0 = 0.5, high 0x2 -> w1 = 1.0
    blocks[0, 1] = 0xF7  # w2 = 6.0, w3 = -6.0
    blocks[0, 15] = 0x98  # w30 = -0, w31 = -0.5
    scales = torch.tensor([127 + 2], dtype=torch.uint8)  # 2**2
    got = dequantize_mxfp4(blocks, scales)
    want = torch.zeros(32)
    want[0], want[1], want[2], want[3], want[31] = 2.0, 4.0, 24.0, -24.0, -2.0
    assert torch.equal(got, want)
    # a negative exponent: scale byte 125 = 2**-2
    assert torch.equal(dequantize_mxfp4(blocks, torch.tensor([125], dtype=torch.uint8))[:4],
                       torch.tensor([0.125, 0.25, 1.5, -1.5]))


def test_every_code_decodes_to_the_e2m1_value():
    # E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal.
    def e2m1(code: int) -> float:
        sign = -1.0 if code & 8 else 1.0
        exp, man = (code >> 1) & 3, code & 1
        return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2 ** (exp - 1))

    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes[0::2] | (codes[1::2] << 4)).repeat(2).reshape(1, 16)
    got = dequantize_mxfp4(blocks, torch.tensor([127], dtype=torch.uint8))
    assert got.tolist() == [e2m1(c) for c in list(range(16)) * 2]


def test_quantize_is_the_nearest_code_and_round_trips():
    w = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(0))
    blocks, scales = quantize_mxfp4(w)
    assert blocks.shape == (4, 3, 2, 16) and scales.shape == (4, 3, 2)
    d = dequantize_mxfp4(blocks, scales)
    # error bounded by half the largest code gap (2.0 between 4 and 6) times the scale
    scale = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    assert ((d - w).abs() <= scale * 1.0 + 1e-6).all()
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(d)), d)
