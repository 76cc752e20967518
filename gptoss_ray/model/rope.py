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
    """cos/sin for every position up to max_positions, computed once per model (not per
    layer per step, as vLLM's cos_sin_cache): a decode step looks its rows up once and
    every layer rotates q and k with three ops.

    The table is a plain attribute built on first use for the device and dtype asked for
    (not a buffer: the model is built on the meta device and loaded after). Row p holds
    [cos, cos, -sin, sin] (each D/2) scaled by the YaRN concentration and rounded once to
    the activation dtype, as the per-step computation rounded them; so that
    x * [cos, cos] + [x2, x1] * [-sin, sin] is the first-half / second-half rotation."""

    def __init__(self, head_dim: int, theta: float, yarn: YarnScaling | None, max_positions: int):
        super().__init__()
        self.inv_freq, self.scale = inv_freq_and_scale(head_dim, theta, yarn)
        self.max_positions = max_positions
        self._table: torch.Tensor | None = None  # [P, 2D] in the activation dtype

    def table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        t = self._table
        if t is None or t.device != device or t.dtype != dtype:
            freqs = torch.arange(self.max_positions, dtype=torch.float32)[:, None] * self.inv_freq[None, :]  # [P, D/2]
            cos, sin = freqs.cos() * self.scale, freqs.sin() * self.scale
            t = self._table = torch.cat((cos, cos, -sin, sin), dim=-1).to(device=device, dtype=dtype)
        return t

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, 1, D] each, for `rotate`: one gather per step."""
        rows = self.table(positions.device, dtype)[positions]  # [T, 2D]
        cos, sin = rows[:, None, :].chunk(2, dim=-1)
        return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated (first half / second half pairing) by RotaryEmbedding.lookup's rows."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)
