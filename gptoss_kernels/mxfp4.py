"""MXFP4 (OCP Microscaling FP4) packing, the torch reference.

A block of 32 weights shares one E8M0 scale byte s (value 2**(s - 127)); each weight is
FP4 E2M1 (1 sign, 2 exponent, 1 mantissa bit), two per byte, low nibble first. This is
the layout of the `*_blocks` / `*_scales` tensors in openai/gpt-oss checkpoints:
blocks [..., G, 16] uint8 and scales [..., G] uint8 for rows of G * 32 weights.
"""

from __future__ import annotations

import torch

BLOCK = 32  # weights per scale
# E2M1 code -> value; codes 8..15 are the negatives of 0..7.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# byte -> its two values (low nibble first): one table lookup decodes a whole byte
_BYTE_VALUES = torch.stack([torch.tensor(FP4_VALUES).repeat(16), torch.tensor(FP4_VALUES).repeat_interleave(16)], 1)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., G, 16] uint8 blocks and [..., G] uint8 scales -> [..., G * 32] values."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    values = _BYTE_VALUES.to(blocks.device)[blocks.long()].flatten(-2)  # [..., G, 32]
    scale = torch.exp2(scales.float() - 127).unsqueeze(-1)  # E8M0: a power of two, exact in float32
    return (values * scale).flatten(-2).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N] float (N a multiple of 32) -> (blocks [..., N/32, 16] uint8, scales [..., N/32] uint8).

    Rounds each value to the nearest E2M1 code after dividing by the block's power-of-two
    scale, chosen so the block's largest magnitude fits under 6.0 (the largest code).
    Used to write checkpoints; dequantize(quantize(dequantize(b, s))) == dequantize(b, s).
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"last dim {weight.shape[-1]} is not a multiple of {BLOCK}")
    w = weight.float().reshape(*weight.shape[:-1], -1, BLOCK)  # [..., G, 32]
    amax = w.abs().amax(dim=-1).clamp_min(2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)  # amax / 2**e <= 6
    scaled = w / torch.exp2(exponent).unsqueeze(-1)
    magnitudes = torch.tensor(FP4_VALUES[:8], device=w.device)
    codes = (scaled.abs().unsqueeze(-1) - magnitudes).abs().argmin(dim=-1)  # [..., G, 32] in 0..7
    codes = codes + 8 * (scaled < 0).long()
    codes = codes.to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()
