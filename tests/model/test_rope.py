"""Interleaved YaRN RoPE against an fp64 re-derivation of the YaRN formulas."""

import math

import torch

from deepseek_model.config import ModelConfig
from deepseek_model.rope import apply_rotary, inv_frequencies, rotary_table


def _yarn_freqs_fp64(cfg):
    d, theta, rs = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling
    def corr(r):
        return d * math.log(rs.original_max_position_embeddings / (2 * math.pi * r)) / (2 * math.log(theta))
    low = max(math.floor(corr(rs.beta_fast)), 0)
    high = min(math.ceil(corr(rs.beta_slow)), d - 1)
    out = []
    for i in range(d // 2):
        f = theta ** (-2 * i / d)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f / rs.factor * ramp + f * (1 - ramp))
    return torch.tensor(out, dtype=torch.float64)


def test_yarn_frequencies_v3_and_tiny():
    for name in ("deepseek-v3", "tiny", "deepseek-v2-lite"):
        cfg = ModelConfig.builtin(name)
        torch.testing.assert_close(inv_frequencies(cfg).double(), _yarn_freqs_fp64(cfg), rtol=1e-6, atol=0)


def test_rotation_is_interleaved_pairs():
    cfg = ModelConfig.builtin("tiny")
    d = cfg.qk_rope_head_dim
    x = torch.randn(2, 5, 3, d, dtype=torch.float64)
    start = 7  # positions 7..11
    got = apply_rotary(x.float(), rotary_table(inv_frequencies(cfg), start, 5)).double()
    freqs = _yarn_freqs_fp64(cfg)
    want = torch.empty_like(x)
    for t in range(5):
        ang = (start + t) * freqs  # (d/2,)
        c, s = ang.cos(), ang.sin()
        x0, x1 = x[:, t, :, 0::2], x[:, t, :, 1::2]
        want[:, t, :, 0::2] = x0 * c - x1 * s
        want[:, t, :, 1::2] = x0 * s + x1 * c
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the half-split ("neox") convention is a different function
    half = torch.cat([x[..., : d // 2], x[..., d // 2:]], -1)
    neox = torch.empty_like(x)
    for t in range(5):
        ang = (start + t) * freqs
        c, s = ang.cos(), ang.sin()
        a, b = half[:, t, :, : d // 2], half[:, t, :, d // 2:]
        neox[:, t] = torch.cat([a * c - b * s, b * c + a * s], -1)
    assert (neox - want).abs().max() > 0.1
