"""Rotary position tables: the inverse frequencies of plain and scaled RoPE, and the cos/sin tables.

The scalings are Hugging Face's (`rope_scaling` in a model's config.json), computed as transformers
computes them, so an imported model sees the positions it was trained with:

    linear    every frequency divided by `factor` (positions interpolated)
    llama3    Llama 3.1's frequency-dependent scaling: wavelengths longer than
              original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter
              than original_max_position_embeddings / high_freq_factor are kept, and the band in
              between is blended smoothly
    dynamic   NTK-aware scaling that stretches the base only for sequences longer than the model's
              max_position_embeddings; our model never runs beyond max_seq_len (its
              max_position_embeddings), where dynamic equals plain RoPE
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from angelptm.config import RopeScalingConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: Optional[RopeScalingConfig],
                        device: Optional[torch.device] = None) -> torch.Tensor:
    """The (head_dim / 2,) angular frequencies, in float64, of RoPE with base `theta` and `scaling`."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling is None or scaling.type == "dynamic":
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    old_context, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    # 0 at the long-wavelength end of the band (fully scaled), 1 at the short end (kept).
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelength > old_context / low, inv_freq / scaling.factor, inv_freq)
    in_band = (wavelength >= old_context / high) & (wavelength <= old_context / low)
    return torch.where(in_band, blended, scaled)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float,
                scaling: Optional[RopeScalingConfig] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (len(positions), head_dim) for the rotate-half convention."""
    inv_freq = inverse_frequencies(head_dim, theta, scaling, positions.device)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x of shape (batch, seq, heads, head_dim) by the tables of shape (seq, head_dim), or
    (batch, seq, head_dim) where each row has positions of its own (packed documents)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)
