"""Triton FP8 quantization kernels: per-token activation quantization and block weight dequant.

Numerics match the torch twins in reference.py bit for bit (on the interpreter and on a GPU):
divisions use `tl.math.div_rn`, and fp8 / bf16 outputs are written as bit patterns built with
integer round-to-nearest-even (see rounding.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_model.constants import is_pow2
from deepseek_model.kernels import reference
from deepseek_model.kernels.rounding import ACT_AMAX_FLOOR, E4M3_MAX, bf16_bits, e4m3_code, ue8m0

FP8_DTYPE = reference.FP8_DTYPE
FP8_MAX = reference.FP8_MAX
BLOCK = reference.BLOCK
ACT_ROWS_PER_PROGRAM = 16  # rows of x quantized by one act_quant program
SCALE_ROW_ALIGN = reference.SCALE_ROW_ALIGN
FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
DEQUANT_OUTPUTS = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def program_tile(M, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [M, K] tile of program (pid 0, pid 1): its row and column indices and the in-bounds mask."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    return rows, cols, (rows[:, None] < M) & (cols[None, :] < K)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K,
                      stride_xm, stride_ym, stride_sm, stride_sk,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr):
    """Quantize a BLOCK_M × BLOCK_K tile of x to fp8 e4m3 with one scale per row.

    Pointers:
        x_ptr: [M, K] fp32 / bf16 / fp16, row stride `stride_xm`, unit column stride.
        y_ptr: [M, K] uint8 view of the float8_e4m3fn output, row stride `stride_ym`.
        s_ptr: [M, ceil(K / BLOCK_K)] fp32 scales with strides (stride_sm, stride_sk) — row- or
            column-major.
    Grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)); program (pm, pk) owns rows pm·BLOCK_M.. and the
    K block pk. s = max(amax, 1e-4) / 448 (optionally rounded up to a power of two), y = x / s;
    amax leaves NaN out (a NaN keeps its own NaN code; an inf makes the scale inf).
    """
    pid_k = tl.program_id(1)
    rows, cols, mask = program_tile(M, K, BLOCK_M, BLOCK_K)  # (BLOCK_M,), (BLOCK_K,), (BLOCK_M, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)  # upcast right after the load (interpreter bf16 math is unreliable)
    amax = tl.maximum(tl.max(tl.where(x != x, 0.0, tl.abs(x)), axis=1), ACT_AMAX_FLOOR)  # (BLOCK_M,): NaN left out
    s = tl.math.div_rn(amax, E4M3_MAX)
    if UE8M0:
        s = ue8m0(s)
    y = tl.math.div_rn(x, s[:, None])
    code = e4m3_code(y).to(tl.uint8)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], code, mask=mask)
    tl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, s, mask=rows < M)


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None,
              column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token per `block_size` channels to fp8 e4m3 (Triton).

    Args:
        x: [..., K] fp32 / bf16 / fp16 tensor.
        block_size: channels per scale (a power of two >= 32).
        scale_fmt: None (fp32 scales) or "ue8m0" (scales rounded up to powers of two).
        column_major_scales: store the scales column-major (a [KB, M_pad] buffer viewed as
            [M, KB], M_pad a multiple of 4), the layout TMA-based GEMMs read; x must be 2-D.

    Returns:
        (y, s): y float8_e4m3fn [..., K]; s fp32 [..., ceil(K/block_size)], x ≈ y · s.
    """
    reference._check_scale_fmt(scale_fmt)
    if x.dtype not in FLOAT_INPUTS:
        raise ValueError(f"x: expected one of {FLOAT_INPUTS}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: expected a non-empty last dimension, got shape {tuple(x.shape)}")
    if not is_pow2(block_size) or block_size < 32:
        raise ValueError(f"block_size: expected a power of two >= 32, got {block_size}")
    if column_major_scales and x.dim() != 2:
        raise ValueError(f"x: column_major_scales needs a 2-D x, got shape {tuple(x.shape)}")
    *lead, k = x.shape
    x2 = x.reshape(-1, k)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    kb = triton.cdiv(k, block_size)
    y = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    if column_major_scales:
        m_pad = triton.cdiv(m, SCALE_ROW_ALIGN) * SCALE_ROW_ALIGN
        s = torch.empty((kb, m_pad), dtype=torch.float32, device=x.device)[:, :m].t()  # (M, KB) col-major
    else:
        s = torch.empty((m, kb), dtype=torch.float32, device=x.device)  # (M, KB)
    if m > 0:
        grid = (triton.cdiv(m, ACT_ROWS_PER_PROGRAM), kb)
        _act_quant_kernel[grid](x2, y.view(torch.uint8), s, m, k,
                                x2.stride(0), y.stride(0), s.stride(0), s.stride(1),
                                BLOCK_M=ACT_ROWS_PER_PROGRAM, BLOCK_K=block_size,
                                UE8M0=scale_fmt == "ue8m0")
    if column_major_scales:
        return y, s
    return y.reshape(*lead, k), s.reshape(*lead, kb)  # (..., K), (..., KB)


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                           BLOCK_SIZE: tl.constexpr, OUT_KIND: tl.constexpr):
    """Dequantize one BLOCK_SIZE × BLOCK_SIZE block: out = w · s[pid_n, pid_k].

    Pointers:
        w_ptr: [N, K] uint8 view of a float8_e4m3fn weight, row stride `stride_wn`.
        s_ptr: [cdiv(N, B), cdiv(K, B)] fp32 scale_inv, row stride `stride_sn`.
        out_ptr: [N, K] output — fp32 (OUT_KIND 0), int16 view of bf16 (1), or fp16 (2).
    Grid: (cdiv(N, B), cdiv(K, B)); ragged edge blocks are masked.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows, cols, mask = program_tile(N, K, BLOCK_SIZE, BLOCK_SIZE)  # (B,), (B,), (B, B)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=mask, other=0)
    nan = (w & 0x7F) == 0x7F  # e4m3fn's NaN codes, decoded explicitly (the CPU interpreter reads them as ±480)
    w = tl.where(nan, float("nan"), w.to(tl.float8e4nv, bitcast=True).to(tl.float32))
    scale = tl.load(s_ptr + pid_n * stride_sn + pid_k)
    out = w * scale
    offs = rows[:, None] * stride_on + cols[None, :]
    if OUT_KIND == 0:
        tl.store(out_ptr + offs, out, mask=mask)
    elif OUT_KIND == 1:
        tl.store(out_ptr + offs, bf16_bits(out), mask=mask)
    else:
        tl.store(out_ptr + offs, out.to(tl.float16), mask=mask)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a block-quantized weight: out[n, k] = w[n, k] · s[n // b, k // b] (Triton).

    Args:
        w: [N, K] float8_e4m3fn weight.
        s: [ceil(N/b), ceil(K/b)] fp32 scale_inv (the multiplier).
        block_size: b, a power of two.
        dtype: output dtype: float32, bfloat16 or float16.

    Returns:
        [N, K] tensor of `dtype`.
    """
    if w.dtype != FP8_DTYPE:
        raise ValueError(f"w: expected {FP8_DTYPE}, got {w.dtype}")
    if s.dtype != torch.float32:
        raise ValueError(f"s: expected torch.float32 scales, got {s.dtype}")
    if dtype not in DEQUANT_OUTPUTS:
        raise ValueError(f"dtype: expected one of {DEQUANT_OUTPUTS}, got {dtype}")
    if not is_pow2(block_size):
        raise ValueError(f"block_size: expected a power of two, got {block_size}")
    reference.check_weight_scale(w, s, block_size, name="w")
    w = w if w.stride(-1) == 1 else w.contiguous()
    s = s if s.stride(-1) == 1 else s.contiguous()
    n, k = w.shape
    out = torch.empty((n, k), dtype=dtype, device=w.device)
    out_kind = DEQUANT_OUTPUTS.index(dtype)
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    if n * k > 0:
        grid = (triton.cdiv(n, block_size), triton.cdiv(k, block_size))
        _weight_dequant_kernel[grid](w.view(torch.uint8), s, out_view, n, k,
                                     w.stride(0), s.stride(0), out.stride(0),
                                     BLOCK_SIZE=block_size, OUT_KIND=out_kind)
    return out
