"""Triton kernels of DeepSeek-V3.2 sparse attention (DSA): indexer logits and sparse MLA decode.

`_index_logits_kernel` scores query tokens against index keys (the lightning indexer): one program
holds one query token's [H, D] heads and a BLOCK_S-key tile, takes one tensor-core dot (fp8 × fp8
or fp16 × fp16 as loaded, accumulated in fp32; any other mix is upcast to fp32 for an IEEE fp32
dot), applies ReLU, weights the heads and sums them. Every product of two fp8 (or two fp16) values
is exact in fp32, so the result equals reference.index_logits to fp32 summation round-off.

`sparse_mla_decode` is absorbed-MLA decode over the cache rows a query selected: mla_decode's
split kernel in its SPARSE form, where each program gathers BLOCK_N rows at a time by index, runs
an online softmax over its share of the K indices (-1 entries are skipped) and writes a normalised
partial output and its log-sum-exp, which `_mla_combine_kernel` merges. Math is fp32 throughout
(cache loads upcast, IEEE fp32 dots), so it matches reference.sparse_mla_decode to fp32 round-off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepseek_model.kernels import reference
from deepseek_model.kernels.mla_decode import MAX_SPLITS, check_operands, run_splits

# Indexer logits (published: H = 64 heads, D = 128, S up to 128k keys).
INDEX_BLOCK_S = 128  # keys per program: the dot is [BLOCK_H, D] x [D, 128], a full wgmma N
INDEX_NUM_WARPS = 4  # one warpgroup: the [64, 128] fp32 accumulator is 64 registers a thread
MIN_BLOCK_H = 16  # tl.dot needs at least 16 rows; extra heads are masked to zero
MIN_BLOCK_D = 32  # fp8 tensor-core dots need a reduction of at least 32; extra channels are zero
# Operand dtypes tl.dot takes as they are (products exact in fp32, fp32 accumulation). Not bf16: the
# Triton 3.9 interpreter multiplies bf16 operands as their raw uint16 bits, so a bf16 dot could
# not be tested on CPU; bf16 is upcast to fp32 like every other float dtype.
NATIVE_DOT_DTYPES = (reference.FP8_DTYPE, torch.float16)

# Sparse MLA decode (published: C = 512, R = 64, H = 128 or 128 / TP, K = 2048 selected keys).
KEYS_PER_SPLIT = 128  # default split: K = 2048 → 16 splits, enough programs for one sequence


@triton.jit
def _index_logits_kernel(q_ptr, qs_ptr, k_ptr, ks_ptr, w_ptr, out_ptr, T, H, S, D,
                         stride_qb, stride_qt, stride_qh, stride_qsb, stride_qst,
                         stride_kb, stride_kn, stride_ksb, stride_wb, stride_wt, stride_ob, stride_ot,
                         Q_SCALED: tl.constexpr, K_SCALED: tl.constexpr, NATIVE_DOT: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """logits[b, t, s-tile] = k_scale · Σ_h (weights · q_scale)[h] · ReLU(q[h]·k[s]) for one query token.

    Pointers (unit stride on the last dimension everywhere):
        q_ptr: [B, T, H, D] queries; k_ptr: [B, S, D] keys (fp8 or float).
        qs_ptr: [B, T, H] fp32 query scales (read only if Q_SCALED); ks_ptr: [B, S] fp32 key
            scales (read only if K_SCALED); w_ptr: [B, T, H] fp32 head weights.
        out_ptr: [B, T, S] fp32 logits.
    NATIVE_DOT: q and k share an fp8 or fp16 dtype and go to tl.dot as they are (exact products,
    fp32 accumulation); otherwise both are upcast to fp32 for an IEEE fp32 dot.
    Grid: (B·T, cdiv(S, BLOCK_S)); BLOCK_H >= H, BLOCK_D >= D.
    """
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # (BS,)
    offs_h = tl.arange(0, BLOCK_H)  # (BH,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    mask_s = offs_s < S
    mask_h = offs_h < H
    mask_d = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + t * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # (BH, BD)
    k = tl.load(k_ptr + b * stride_kb + offs_s[:, None] * stride_kn + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # (BS, BD)
    if NATIVE_DOT:
        dots = tl.dot(q, tl.trans(k), out_dtype=tl.float32)  # (BH, BS)
    else:
        dots = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")  # (BH, BS)
    head_w = tl.load(w_ptr + b * stride_wb + t * stride_wt + offs_h, mask=mask_h, other=0.0)  # (BH,)
    if Q_SCALED:
        head_w = head_w * tl.load(qs_ptr + b * stride_qsb + t * stride_qst + offs_h, mask=mask_h, other=0.0)
    logits = tl.sum(tl.maximum(dots, 0.0) * head_w[:, None], axis=0)  # (BS,); padded heads weigh 0
    if K_SCALED:
        logits = logits * tl.load(ks_ptr + b * stride_ksb + offs_s, mask=mask_s, other=0.0)
    tl.store(out_ptr + b * stride_ob + t * stride_ot + offs_s, logits, mask=mask_s)


def index_block_sizes(heads: int, dim: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D) of the indexer kernel: powers of two covering H and D, at least the dot minimums."""
    return max(MIN_BLOCK_H, triton.next_power_of_2(heads)), max(MIN_BLOCK_D, triton.next_power_of_2(dim))


def index_logits(q: torch.Tensor, q_scale: torch.Tensor | None, k: torch.Tensor, k_scale: torch.Tensor | None,
                 weights: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer logits (Triton); see reference.index_logits for the math.

    Args:
        q: [B, T, H, D] float8_e4m3fn or float queries (last dimension contiguous).
        q_scale: [B, T, H] fp32 positive scales, or None (float q).
        k: [B, S, D] float8_e4m3fn or float keys (last dimension contiguous).
        k_scale: [B, S] fp32 positive scales, or None (float k).
        weights: [B, T, H] fp32 head weights.

    Returns:
        logits [B, T, S] fp32, unmasked.
    """
    reference.check_index_inputs(q, q_scale, k, k_scale, weights)
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous")
    b, t, h, d = q.shape
    s = k.shape[1]
    out = torch.empty((b, t, s), dtype=torch.float32, device=q.device)  # (B, T, S)
    if out.numel() == 0:
        return out
    block_h, block_d = index_block_sizes(h, d)
    native = q.dtype == k.dtype and q.dtype in NATIVE_DOT_DTYPES
    w = weights.contiguous()  # (B, T, H)
    qs = w if q_scale is None else q_scale.contiguous()  # (B, T, H); a placeholder when unscaled
    ks = out if k_scale is None else k_scale.contiguous()  # (B, S); a placeholder when unscaled
    _index_logits_kernel[(b * t, triton.cdiv(s, INDEX_BLOCK_S))](
        q, qs, k, ks, w, out, t, h, s, d,
        q.stride(0), q.stride(1), q.stride(2), qs.stride(0), qs.stride(1),
        k.stride(0), k.stride(1), ks.stride(0), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        Q_SCALED=q_scale is not None, K_SCALED=k_scale is not None, NATIVE_DOT=native,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_S=INDEX_BLOCK_S, num_warps=INDEX_NUM_WARPS)
    return out


def default_sparse_splits(num_indices: int) -> int:
    """About KEYS_PER_SPLIT selected keys per program, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, triton.cdiv(num_indices, KEYS_PER_SPLIT)))


def sparse_mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                      indices: torch.Tensor, scale: float, num_splits: int | None = None) -> torch.Tensor:
    """Absorbed MLA decode over the selected cache rows (DSA), split-K flash-decoding (Triton).

    Args:
        q_lat: [B, H, C] absorbed query; C a power of two.
        q_rope: [B, H, R] rotated rope query; R a power of two.
        kv: [B, S, C] latent cache (a view [..., :C] of a [B, S, C+R] cache is fine).
        k_rope: [B, S, R] rope keys (e.g. the view [..., C:]).
        indices: [B, K] int32/int64 row positions in [0, S), -1 = no key; each row has a valid one.
        scale: softmax scale.
        num_splits: index-list chunks per (sequence, head block); default about KEYS_PER_SPLIT each.

    Returns:
        o_lat [B, H, C] fp32.
    """
    reference.check_sparse_mla_inputs(q_lat, q_rope, kv, k_rope, indices)
    check_operands(q_lat, q_rope, kv, k_rope)
    splits = num_splits if num_splits is not None else default_sparse_splits(indices.shape[1])
    return run_splits(q_lat, q_rope, kv, k_rope, scale, splits, indices=indices)
