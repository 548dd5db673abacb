"""Triton fused MoE over fp8 routed experts: one grouped GEMM per projection over expert-sorted tokens.

Pipeline (W8A8 like every other fp8 projection: 1x128 activation tiles, 128x128 weight blocks):
  1. moe_align_block_size (torch): sort the (token, slot) pairs by expert, pad each expert's run
     to a multiple of BLOCK_M; one expert id per BLOCK_M block (experts with no tokens get none);
  2. act_quant(x) once per token (Triton);
  3. grouped GEMM  gate‖up = a · w13[e]ᵀ (fp32) for every pair;
  4. SwiGLU h = silu(g) · u fused with the per-128-channel act_quant of h (Triton);
  5. grouped GEMM  y = hq · w2[e]ᵀ · routed weight (fp32) for every pair;
  6. out[t] = Σ_slot y[t·topk + slot] (torch sum over topk, deterministic).
The torch twin is reference.fused_moe (a per-expert loop); they agree to fp32 round-off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_model.kernels import reference
from deepseek_model.kernels.fp8_gemm import grouped_pid
from deepseek_model.kernels.fp8_quant import act_quant
from deepseek_model.kernels.rounding import ACT_AMAX_FLOOR, E4M3_MAX, e4m3_code, ue8m0
from deepseek_model.kernels.tiles import TileConfig, check_tile, get_moe_tile

BLOCK = reference.BLOCK
SWIGLU_ROWS = 16  # pairs per silu_mul_quant program


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort routed (token, slot) pairs by expert and pad every expert's run to a multiple of block_m.

    Args:
        topk_ids: [T, topk] int expert ids.
        num_experts: E.
        block_m: rows per GEMM block.

    Returns:
        sorted_ids: [P_pad] int32 pair indices p = t·topk + slot, grouped by expert (stable order),
            padded with the sentinel P = T·topk;
        expert_ids: [P_pad / block_m] int32 expert of each block.
    """
    flat = topk_ids.reshape(-1).long()  # (P,)
    p = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    pad_start = torch.cumsum(padded, 0) - padded  # (E,) first padded row of each expert
    run_start = torch.cumsum(counts, 0) - counts  # (E,) first sorted pair of each expert
    order = torch.argsort(flat, stable=True)  # (P,) pairs sorted by expert
    rank = torch.arange(p, device=flat.device) - run_start[flat[order]]  # (P,) position inside the run
    sorted_ids = torch.full((int(padded.sum()),), p, dtype=torch.int32, device=flat.device)
    sorted_ids[pad_start[flat[order]] + rank] = order.to(torch.int32)
    expert_ids = torch.repeat_interleave(torch.arange(num_experts, device=flat.device),
                                         padded // block_m).to(torch.int32)
    return sorted_ids, expert_ids


@triton.jit
def _moe_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, tw_ptr, sorted_ptr, expert_ptr,
                     num_pairs, N, K, num_rows,
                     stride_am, stride_asm, stride_ask, stride_we, stride_wn, stride_wse, stride_wsn,
                     stride_cm,
                     TOP_K: tl.constexpr, A_PER_TOKEN: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """One BLOCK_M × BLOCK_N tile of C[pair, n] = A[row(pair)]·W[e]ᵀ for one expert block.

    Pointers:
        a_ptr: fp8 activations, unit column stride: [T, K] per token (A_PER_TOKEN, row = pair //
            TOP_K) or [P, K] per pair (row = pair).
        as_ptr: fp32 activation scales [rows, cdiv(K, BLOCK_K)] (strides stride_asm, stride_ask).
        w_ptr: [E, N, K] fp8 expert weights (unit K stride); ws_ptr: [E, cdiv(N, B), cdiv(K, B)] fp32.
        c_ptr: [P, N] fp32 output (row stride stride_cm), one row per routed pair.
        tw_ptr: [P] fp32 routed weights, multiplied in when MUL_WEIGHT.
        sorted_ptr: [num_rows] int32 pair ids sorted by expert (sentinel num_pairs = padding).
        expert_ptr: [num_rows / BLOCK_M] int32 expert of each block.
    Grid: (num_rows / BLOCK_M · cdiv(N, BLOCK_N),). The scale rule is fp8_gemm's.
    """
    pid_m, pid_n = grouped_pid(tl.program_id(0), num_rows, N, BLOCK_M, BLOCK_N, GROUP_M)
    pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # (BM,)
    valid = pairs < num_pairs
    if A_PER_TOKEN:
        rows = pairs // TOP_K
    else:
        rows = pairs
    expert = tl.load(expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_n = offs_n < N
    w_base = w_ptr + expert * stride_we
    ws_base = ws_ptr + expert * stride_wse
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + offs_k[None, :],
                    mask=valid[:, None] & mask_k[None, :], other=0.0)  # (BM, BK) fp8
        w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # (BK, BN) fp8
        part = tl.dot(a, w, out_dtype=tl.float32)
        a_s = tl.load(as_ptr + rows * stride_asm + kb * stride_ask, mask=valid, other=0.0)
        w_s = tl.load(ws_base + (offs_n // BLOCK_K) * stride_wsn + kb, mask=mask_n, other=0.0)
        acc += part * a_s[:, None] * w_s[None, :]
    if MUL_WEIGHT:
        acc = acc * tl.load(tw_ptr + pairs, mask=valid, other=0.0)[:, None]
    tl.store(c_ptr + pairs[:, None] * stride_cm + offs_n[None, :], acc,
             mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _silu_mul_quant_kernel(gu_ptr, y_ptr, s_ptr, P, INTER, stride_gu, stride_y, stride_s,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr):
    """h = silu(g)·u for one BLOCK_M × BLOCK_K tile, quantized like act_quant (one scale per row).

    Pointers:
        gu_ptr: [P, 2·INTER] fp32, gate columns then up columns (row stride stride_gu).
        y_ptr: [P, INTER] uint8 view of the float8_e4m3fn output; s_ptr: [P, cdiv(INTER, BLOCK_K)] fp32.
    Grid: (cdiv(P, BLOCK_M), cdiv(INTER, BLOCK_K)).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < P) & (cols[None, :] < INTER)
    base = gu_ptr + rows[:, None] * stride_gu + cols[None, :]
    g = tl.load(base, mask=mask, other=0.0)
    u = tl.load(base + INTER, mask=mask, other=0.0)
    h = tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u  # torch's silu: x / (1 + exp(-x))
    amax = tl.maximum(tl.max(tl.abs(h), axis=1), ACT_AMAX_FLOOR)
    s = tl.math.div_rn(amax, E4M3_MAX)
    if UE8M0:
        s = ue8m0(s)
    code = e4m3_code(tl.math.div_rn(h, s[:, None])).to(tl.uint8)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], code, mask=mask)
    tl.store(s_ptr + rows * stride_s + tl.program_id(1), s, mask=rows < P)


def _grouped_gemm(a, a_s, w, w_s, out, topk_weights, sorted_ids, expert_ids, num_pairs, top_k,
                  a_per_token, mul_weight, cfg, block_size):
    n, k = w.shape[1], w.shape[2]
    num_rows = sorted_ids.numel()
    grid = (num_rows // cfg.BLOCK_M * triton.cdiv(n, cfg.BLOCK_N),)
    _moe_gemm_kernel[grid](
        a, a_s, w, w_s, out, topk_weights, sorted_ids, expert_ids, num_pairs, n, k, num_rows,
        a.stride(0), a_s.stride(0), a_s.stride(1), w.stride(0), w.stride(1), w_s.stride(0), w_s.stride(1),
        out.stride(0), TOP_K=top_k, A_PER_TOKEN=a_per_token, MUL_WEIGHT=mul_weight,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=block_size, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor,
              block_size: int = BLOCK, scale_fmt: str | None = None,
              config: TileConfig | None = None) -> torch.Tensor:
    """Routed experts as two grouped fp8 GEMMs over expert-sorted tokens (Triton).

    Args:
        x: [T, H] fp32 / bf16 / fp16 activations.
        topk_weights: [T, topk] routing weights (normalised and scaled by the caller).
        topk_ids: [T, topk] int expert ids in [0, E).
        w13: [E, 2I, H] float8_e4m3fn gate rows then up rows; w13_s [E, ceil(2I/b), ceil(H/b)] fp32.
        w2: [E, H, I] float8_e4m3fn; w2_s [E, ceil(H/b), ceil(I/b)] fp32.
        block_size: b (power of two >= 32).
        scale_fmt: activation scale format (None or "ue8m0").
        config: tile override (SPLIT_K ignored); default from tiles.json "moe".

    Returns:
        [T, H] in x.dtype (accumulated in fp32).
    """
    reference.check_moe_inputs(x, topk_weights, topk_ids, w13, w13_s, w2, w2_s, block_size)
    reference._check_scale_fmt(scale_fmt)
    for name, t in (("w13_s", w13_s), ("w2_s", w2_s)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: expected torch.float32 scales, got {t.dtype}")
    t_tokens, hidden = x.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = t_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    cfg = config if config is not None else get_moe_tile(-(-num_pairs // num_experts))
    check_tile(cfg, block_size)
    w13, w2 = w13.contiguous(), w2.contiguous()
    sorted_ids, expert_ids = moe_align_block_size(topk_ids, num_experts, cfg.BLOCK_M)
    tw = topk_weights.reshape(-1).float().contiguous()  # (P,)
    a, a_s = act_quant(x.contiguous(), block_size, scale_fmt)  # (T, H) fp8, (T, HB)
    gu = torch.empty((num_pairs, two_inter), dtype=torch.float32, device=x.device)  # (P, 2I)
    _grouped_gemm(a, a_s, w13, w13_s, gu, tw, sorted_ids, expert_ids, num_pairs, top_k,
                  True, False, cfg, block_size)
    hq = torch.empty((num_pairs, inter), dtype=reference.FP8_DTYPE, device=x.device)  # (P, I)
    hs = torch.empty((num_pairs, triton.cdiv(inter, block_size)), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(num_pairs, SWIGLU_ROWS), triton.cdiv(inter, block_size))
    _silu_mul_quant_kernel[grid](gu, hq.view(torch.uint8), hs, num_pairs, inter, gu.stride(0),
                                 hq.stride(0), hs.stride(0), BLOCK_M=SWIGLU_ROWS, BLOCK_K=block_size,
                                 UE8M0=scale_fmt == "ue8m0")
    y = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)  # (P, H)
    _grouped_gemm(hq, hs, w2, w2_s, y, tw, sorted_ids, expert_ids, num_pairs, top_k,
                  False, True, cfg, block_size)
    return y.view(t_tokens, top_k, hidden).sum(dim=1).to(x.dtype)  # (T, H)
