"""Triton block-scaled FP8 GEMM: C = A·Wᵀ with fp32 accumulation, scales applied per 128-wide K block.

Numerics (DeepSeek-V3's block-FP8 inference): for each K block kb, acc += (A_blk·W_blkᵀ) · a_s[m, kb] · w_s[n // 128, kb],
multiplied and added in exactly that order as separate fp32 operations (the launch passes
`enable_fp_fusion=False`, so a GPU does not contract them into an FMA); bf16 output is rounded
with integer RNE. Without split-K the result therefore equals the torch twin bit for bit whenever
each K-block dot product is exact in fp32 (its summation order is the hardware's); otherwise to
fp32 round-off. Small-M shapes may split K across programs: each split writes an fp32 partial to a
workspace and `_splitk_reduce_kernel` sums the splits in a fixed order (deterministic, no atomics),
which is not the twin's left-to-right order over K blocks: split-K results agree with the twin to
fp32 round-off, bit for bit only where the partial sums are exact (e.g. power-of-two scales).
The CPU interpreter reads fp8 NaN bytes in `tl.dot` operands as ±480 (a GPU reads NaN); the
model refuses NaN weights at load, and `act_quant` maps NaN activations to NaN codes only where they are.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_model.kernels import reference
from deepseek_model.kernels.rounding import bf16_bits
from deepseek_model.kernels.tiles import TileConfig, check_tile, get_tile

FP8_DTYPE = reference.FP8_DTYPE
BLOCK = reference.BLOCK
GEMM_OUTPUTS = (torch.float32, torch.bfloat16)
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 128


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (pid_m, pid_n) in GROUP_M-row super-blocks (L2 reuse of W)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, KB_PER_SPLIT,
                     stride_am, stride_ak, stride_asm, stride_ask,
                     stride_wn, stride_wk, stride_wsn, stride_wsk,
                     stride_cs, stride_cm, stride_cn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, BF16_OUT: tl.constexpr):
    """One BLOCK_M × BLOCK_N tile of C over the K blocks of one split.

    Pointers:
        a_ptr: [M, K] float8_e4m3fn activations (strides stride_am, stride_ak).
        as_ptr: [M, cdiv(K, BLOCK_K)] fp32 activation scales (any strides: row- or column-major).
        w_ptr: [N, K] float8_e4m3fn weight (strides stride_wn, stride_wk).
        ws_ptr: [cdiv(N, BLOCK_K), cdiv(K, BLOCK_K)] fp32 weight scale_inv.
        c_ptr: [S, M, N] output: fp32, or the int16 view of bf16 when BF16_OUT (then S == 1);
            split s writes plane s (stride_cs).
    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N), S); program (pid, s) covers the K blocks
    [s · KB_PER_SPLIT, (s + 1) · KB_PER_SPLIT) ∩ [0, cdiv(K, BLOCK_K)). BLOCK_K is the scale block.
    """
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kb_begin = pid_s * KB_PER_SPLIT
    kb_end = tl.minimum(kb_begin + KB_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_begin, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)  # (BK,)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK) fp8
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BK, BN) fp8 = W_blkᵀ
        part = tl.dot(a, w, out_dtype=tl.float32)  # (BM, BN), fp8 dot, fp32 result
        a_s = tl.load(as_ptr + offs_m * stride_asm + kb * stride_ask, mask=mask_m, other=0.0)  # (BM,)
        w_s = tl.load(ws_ptr + (offs_n // BLOCK_K) * stride_wsn + kb * stride_wsk,
                      mask=mask_n, other=0.0)  # (BN,)
        acc += part * a_s[:, None] * w_s[None, :]
    offs_c = pid_s * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask_c = mask_m[:, None] & mask_n[None, :]
    if BF16_OUT:
        tl.store(c_ptr + offs_c, bf16_bits(acc), mask=mask_c)
    else:
        tl.store(c_ptr + offs_c, acc, mask=mask_c)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, c_ptr, M, N, S, stride_ws, stride_wm, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BF16_OUT: tl.constexpr):
    """C[m, n] = Σ_s ws[s, m, n], summed in split order s = 0, 1, … (deterministic).

    Pointers:
        ws_ptr: [S, M, N] fp32 partials (strides stride_ws, stride_wm, 1).
        c_ptr: [M, N] fp32 output, or the int16 view of a bf16 output when BF16_OUT.
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)).
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + s * stride_ws + offs_m[:, None] * stride_wm + offs_n[None, :],
                       mask=mask, other=0.0)
    offs_c = offs_m[:, None] * stride_cm + offs_n[None, :]
    if BF16_OUT:
        tl.store(c_ptr + offs_c, bf16_bits(acc), mask=mask)
    else:
        tl.store(c_ptr + offs_c, acc, mask=mask)


def check_gemm_inputs(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
                      block_size: int) -> None:
    """Raise ValueError naming the bad argument unless (a, a_s, w, w_s) form a block-fp8 GEMM."""
    reference.check_block_size(block_size)
    for name, t in (("a", a), ("w", w)):
        if t.dtype != FP8_DTYPE:
            raise ValueError(f"{name}: expected {FP8_DTYPE}, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor, got shape {tuple(t.shape)}")
    for name, t in (("a_s", a_s), ("w_s", w_s)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: expected torch.float32 scales, got {t.dtype}")
    m, k = a.shape
    if w.shape[1] != k:
        raise ValueError(f"w: K = {w.shape[1]} does not match a's K = {k}")
    kb = triton.cdiv(k, block_size)
    if tuple(a_s.shape) != (m, kb):
        raise ValueError(f"a_s: expected shape {(m, kb)}, got {tuple(a_s.shape)}")
    reference.check_weight_scale(w, w_s, block_size, name="w_s")
    devices = {t.device for t in (a, a_s, w, w_s)}
    if len(devices) != 1:
        raise ValueError(f"a/a_s/w/w_s: expected one device, got {sorted(map(str, devices))}")


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block_size: int = BLOCK,
             config: TileConfig | None = None) -> torch.Tensor:
    """C = A·Wᵀ over fp8 operands with per-block scales (Triton).

    Args:
        a: [M, K] float8_e4m3fn activations.
        a_s: [M, ceil(K/b)] fp32 activation scales (row- or column-major).
        w: [N, K] float8_e4m3fn weight.
        w_s: [ceil(N/b), ceil(K/b)] fp32 weight scale_inv.
        out_dtype: torch.float32 or torch.bfloat16.
        block_size: b, the scale block and K tile (power of two >= 32).
        config: tile override; default from tiles.json by (N, K, M bucket).

    Returns:
        [M, N] tensor of out_dtype.
    """
    check_gemm_inputs(a, a_s, w, w_s, block_size)
    if out_dtype not in GEMM_OUTPUTS:
        raise ValueError(f"out_dtype: expected one of {GEMM_OUTPUTS}, got {out_dtype}")
    m, k = a.shape
    n = w.shape[0]
    cfg = config if config is not None else get_tile(n, k, m)
    check_tile(cfg, block_size)
    bf16_out = out_dtype == torch.bfloat16
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:  # an empty sum
        return c.zero_()
    kb = triton.cdiv(k, block_size)
    kb_per_split = triton.cdiv(kb, min(cfg.SPLIT_K, kb))
    splits = triton.cdiv(kb, kb_per_split)  # no empty split
    if splits == 1:
        target = c.view(torch.int16) if bf16_out else c
    else:
        target = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)  # (S, M, N)
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N), splits)
    stride_cs = target.stride(0) if splits > 1 else 0
    _fp8_gemm_kernel[grid](
        a, a_s, w, w_s, target, m, n, k, kb_per_split,
        a.stride(0), a.stride(1), a_s.stride(0), a_s.stride(1),
        w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1),
        stride_cs, target.stride(-2), target.stride(-1),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_size, GROUP_M=cfg.GROUP_M,
        BF16_OUT=bf16_out and splits == 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    if splits > 1:
        out = c.view(torch.int16) if bf16_out else c
        rgrid = (triton.cdiv(m, REDUCE_BLOCK_M), triton.cdiv(n, REDUCE_BLOCK_N))
        _splitk_reduce_kernel[rgrid](target, out, m, n, splits, target.stride(0), target.stride(1),
                                     out.stride(0), BLOCK_M=REDUCE_BLOCK_M, BLOCK_N=REDUCE_BLOCK_N,
                                     BF16_OUT=bf16_out, enable_fp_fusion=False)
    return c
