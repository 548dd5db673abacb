"""Bit-exact rounding helpers shared by the Triton kernels (`@triton.jit` device functions).

Why: the Triton 3.2–3.9 CPU interpreter mis-casts fp32 → fp8e4nv (loses the carry when the
mantissa rounds up, truncates subnormals, rounds ties away, turns > 448 into NaN) and truncates
fp32 → bf16 (verified on this project's machines; Triton PR #11897). So every kernel that writes
fp8 or bf16 builds the output BIT PATTERN itself with integer round-to-nearest-even on the fp32
bits and stores it through a uint8 / int16 view of the output tensor. The same integer code runs on a GPU, so interpreter and
GPU agree bit for bit, and both agree with torch's `.to(float8_e4m3fn)` (RNE, saturating to ±448)
and `.to(bfloat16)` (RNE).

e4m3fn layout: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits; normal values 2^-6 .. 448;
subnormals are multiples of 2^-9 below 2^-6; code 0x7F is NaN (never produced from finite input).
"""

from __future__ import annotations

import triton
import triton.language as tl

from deepseek_model.constants import FP8_MAX

# tl.constexpr globals: readable from @triton.jit code (plain module floats are not)
E4M3_MAX = tl.constexpr(FP8_MAX)
E4M3_MIN_NORMAL = tl.constexpr(0.015625)  # 2^-6
E4M3_SUBNORMAL_STEP = tl.constexpr(0.001953125)  # 2^-9
ACT_AMAX_FLOOR = tl.constexpr(1e-4)  # keeps the scale of an all-zero activation group finite


@triton.jit
def e4m3_code(x):
    """fp32 tensor → int32 tensor of e4m3fn codes (0..255), RNE and saturating like torch.

    NaN inputs give the NaN code 0x7F (with the sign bit); ±inf saturate to ±448 as in torch.
    """
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80  # 0x80 if negative (arithmetic shift keeps the sign in bit 7)
    mag = tl.minimum(tl.abs(x), E4M3_MAX)  # saturate first (NaN is handled at the end)
    mbits = mag.to(tl.int32, bitcast=True)
    # --- normal range |x| >= 2^-6: keep 3 of 23 mantissa bits, RNE on the dropped 20 bits.
    lsb = (mbits >> 20) & 1
    rbits = (mbits + 0x7FFFF + lsb) & -1048576  # ~0xFFFFF
    exp_f32 = rbits >> 23  # biased fp32 exponent (sign is 0)
    normal_code = ((exp_f32 - 120) << 3) | ((rbits >> 20) & 7)  # 120 = 127 - 7
    # --- subnormal range: q = RNE(|x| / 2^-9) from the 24-bit significand, q in 0..8
    exp_unb = (mbits >> 23) - 127
    # significand·2^(e-23) / 2^-9 = significand >> (14 - e); a shift >= 25 leaves q = 0
    shift = tl.maximum(tl.minimum(14 - exp_unb, 25), 1)
    signif = (mbits & 0x7FFFFF) | 0x800000
    q = signif >> shift
    rem = signif & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    code = tl.where(mag >= E4M3_MIN_NORMAL, normal_code, q)
    code = tl.where(x != x, 0x7F, code)  # NaN
    return code | sign


@triton.jit
def e4m3_value(x):
    """fp32 tensor → fp32 tensor rounded onto the e4m3 grid (RNE, saturating), exact in fp32."""
    code = e4m3_code(x)
    exp_field = (code >> 3) & 15
    mant = code & 7
    sub = mant.to(tl.float32) * E4M3_SUBNORMAL_STEP  # mant · 2^-9
    norm_bits = ((exp_field + 120) << 23) | (mant << 20)
    norm = norm_bits.to(tl.float32, bitcast=True)
    mag = tl.where(exp_field == 0, sub, norm)
    mag = tl.where((code & 0x7F) == 0x7F, float("nan"), mag)  # the only e4m3fn NaN code
    return tl.where((code & 0x80) != 0, -mag, mag)


@triton.jit
def bf16_bits(x):
    """fp32 tensor → int16 tensor holding the bf16 bit pattern, round-to-nearest-even (as torch)."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = bits + 0x7FFF + lsb
    rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
    return (rounded >> 16).to(tl.int16)


@triton.jit
def ue8m0(s):
    """Positive normal fp32 → the smallest power of two >= s (the UE8M0 scale format)."""
    bits = s.to(tl.int32, bitcast=True)
    exp_bits = bits & 0x7F800000
    up = tl.where((bits & 0x7FFFFF) != 0, exp_bits + 0x800000, exp_bits)
    return tl.where(s > 0, up.to(tl.float32, bitcast=True), s)
