"""The FP8 format of the published DeepSeek-V3 weights, and the small integer helpers around it.

Weights are float8_e4m3fn with one fp32 dequantization multiplier (the scale tensor beside each weight) per
128×128 block; activations and latents are quantized to the same format with a scale of
amax / FP8_MAX. Every module that needs one of these facts imports it from here. The torch dtypes
are resolved on first use, so that importing this module (the CLI's help, `inspect CONFIG`) does
not import torch.
"""

from __future__ import annotations

from typing import Any

_TORCH_DTYPES = {"FP8_DTYPE": "float8_e4m3fn", "SCALE_DTYPE": "float32"}  # FP8 storage, and every FP8 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_BLOCK = 128  # weights: 128×128 blocks; activations: 1×128 groups
SCALE_DTYPE_BYTES = 4  # fp32
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


def __getattr__(name: str) -> Any:
    """FP8_DTYPE (torch.float8_e4m3fn) and SCALE_DTYPE (torch.float32), imported from torch on first use."""
    if name in _TORCH_DTYPES:
        import torch  # noqa: PLC0415

        return getattr(torch, _TORCH_DTYPES[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
