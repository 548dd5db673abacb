"""The FP8 format of the published DeepSeek-V3 weights, and the small integer helpers around it.

Weights are float8_e4m3fn with one fp32 dequantization multiplier (the scale tensor beside each weight) per
128×128 block; activations and latents are quantized to the same format with a scale of
amax / FP8_MAX. Every module that needs one of these facts imports it from here.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_BLOCK = 128  # weights: 128×128 blocks; activations: 1×128 groups
SCALE_DTYPE = torch.float32  # dtype of every FP8 scale
SCALE_FMTS = (None, "ue8m0")  # activation/weight scale formats: plain fp32, or rounded up to a power of two


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for integers (b > 0)."""
    return -(-a // b)


def is_pow2(v: int) -> bool:
    """Whether v is a positive power of two."""
    return v > 0 and v & (v - 1) == 0


def block_grid(shape: tuple[int, ...], block: int = FP8_BLOCK) -> tuple[int, ...]:
    """The scale grid of a weight: ⌈d / block⌉ along every dimension."""
    return tuple(ceil_div(int(d), block) for d in shape)
