"""Rotary position embeddings with YaRN scaling (Peng et al. 2023, arXiv:2309.00071),
as gpt-oss uses them: theta 150000, factor 32 over an original context of 4096,
beta_fast 32 / beta_slow 1, and cos/sin scaled by the "concentration" 0.1 ln(factor) + 1.
The correction range is not rounded to whole dims (gpt-oss's `truncate: false`)."""

from __future__ import annotations

import math

import torch

from gptoss_ray.config import YarnScaling


def inv_freq_and_scale(head_dim: int, theta: float, yarn: YarnScaling | None) -> tuple[torch.Tensor, float]:
    """[D/2] inverse frequencies and the cos/sin scale."""
    freq = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if yarn is None or yarn.factor <= 1.0:
        return (1.0 / freq).float(), 1.0
    d_half = head_dim / 2

    def correction_dim(rotations: float) -> float:
        # the dim whose wavelength fits `rotations` times into the original context
        return d_half * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi)) / math.log(theta)

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d_half, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (yarn.factor * freq)) * ramp + (1.0 / freq) * extrapolate
    return inv_freq.float(), 0.1 * math.log(yarn.factor) + 1.0


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, head_dim: int, theta: float, yarn: YarnScaling | None):
        super().__init__()
        # a plain attribute, not a buffer: it survives building the model on the meta device
        self.inv_freq, self.scale = inv_freq_and_scale(head_dim, theta, yarn)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by positions [T] (first half / second half pairing)."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        cos = (freqs.cos() * self.scale)[:, None, :].to(x.dtype)
        sin = (freqs.sin() * self.scale)[:, None, :].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
