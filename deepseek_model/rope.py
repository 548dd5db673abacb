"""Rotary position embedding: YaRN frequencies, the interleaved (complex-pair) rotation and the
half-split one.

DeepSeek's MLA rotates consecutive pairs (2i, 2i+1) of the rope slice; a half-split ("neox")
rotation there gives fluent but wrong output with the released weights. DeepSeek-V3.2's indexer is
the opposite: it rotates pairs (i, i + rope/2), with the same frequencies. YaRN is applied whenever the checkpoint's
config says so, independent of the runtime context length.
"""

from __future__ import annotations

import math

import torch

from deepseek_model.config import ModelConfig


def yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The rotary dimension whose wavelength completes `num_rotations` turns over `max_pos`."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_correction_range(beta_fast: float, beta_slow: float, dim: int, base: float,
                          max_pos: int) -> tuple[int, int]:
    """(low, high) frequency indices of the YaRN ramp, clamped to [0, dim - 1]."""
    low = math.floor(yarn_correction_dim(beta_fast, dim, base, max_pos))
    high = math.ceil(yarn_correction_dim(beta_slow, dim, base, max_pos))
    return max(low, 0), min(high, dim - 1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1·mscale·ln(scale) + 1 (1 when scale ≤ 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim / 2] (fp32), YaRN-blended when the config says so."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    rs = cfg.rope_scaling
    if rs is None:
        return freqs
    low, high = yarn_correction_range(rs.beta_fast, rs.beta_slow, dim, base, rs.original_max_position_embeddings)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # (dim/2,)
    return freqs / rs.factor * ramp + freqs * (1 - ramp)


def attention_factor(cfg: ModelConfig) -> float:
    """YaRN cos/sin magnitude: mscale(f, mscale) / mscale(f, mscale_all_dim) (1 for every released
    DeepSeek config); mscale(f) when mscale_all_dim is absent, as transformers does."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.mscale and rs.mscale_all_dim:
        return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    return yarn_mscale(rs.factor)


def rotary_table(inv_freq: torch.Tensor, start: int, length: int, magnitude: float = 1.0) -> torch.Tensor:
    """Complex rotations magnitude·e^{i·pos·freq} for positions [start, start + length).

    Args:
        inv_freq: (rope_dim/2,) from inv_frequencies.
        start: first absolute position.
        length: number of positions.
        magnitude: attention_factor(cfg).

    Returns:
        complex64 (length, rope_dim/2).
    """
    pos = torch.arange(start, start + length, dtype=torch.float32, device=inv_freq.device)
    angles = torch.outer(pos, inv_freq.float())  # (T, dim/2)
    return torch.polar(torch.full_like(angles, magnitude), angles)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x.

    Args:
        x: (B, T, H, rope_dim) or (B, T, rope_dim).
        table: complex (T, rope_dim/2) from rotary_table.

    Returns:
        Tensor like x.
    """
    dtype = x.dtype
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, [H,] dim/2)
    rot = table.view(1, table.shape[0], *([1] * (x.dim() - 3)), table.shape[1])  # (1, T, [1,] dim/2)
    return torch.view_as_real(pairs * rot).flatten(-2).to(dtype)


def apply_rotary_half(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs (i, i + dim/2) of the last dim of x (rotate-half, not interleaved).

    Args:
        x: (B, T, H, rope_dim) or (B, T, rope_dim).
        table: complex (T, rope_dim/2) from rotary_table (pair i turns at frequency i).

    Returns:
        Tensor like x.
    """
    dtype = x.dtype
    first, second = x.float().chunk(2, dim=-1)  # (B, T, [H,] dim/2) each
    pairs = torch.complex(first, second)  # (B, T, [H,] dim/2)
    rot = table.view(1, table.shape[0], *([1] * (x.dim() - 3)), table.shape[1])  # (1, T, [1,] dim/2)
    turned = pairs * rot
    return torch.cat([turned.real, turned.imag], dim=-1).to(dtype)
