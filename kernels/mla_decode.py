"""Triton absorbed-MLA decode over the latent cache: split-K flash-decoding.

Each query token (one per sequence) attends with all H heads to the sequence's cached latents.
Keys are 576-wide in DeepSeek-V3, handled as 512 (latent c, also the value) + 64 (shared rope
key): scores = (q_lat·cᵀ + q_rope·k_ropeᵀ)·scale. The sequence is cut into NUM_SPLITS chunks;
`_mla_split_kernel` runs an online softmax over one chunk for BLOCK_H heads and writes the
normalised partial output and its log-sum-exp; `_mla_combine_kernel` merges the chunks. The same
split kernel with SPARSE set gathers the rows a DeepSeek-V3.2 query selected instead of a
contiguous chunk (dsa.sparse_mla_decode).
Math is fp32 throughout (cache loads are upcast right after the load; dots use IEEE fp32, not
TF32), so the result matches reference.mla_decode to fp32 round-off.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from deepseek_model.constants import is_pow2
from deepseek_model.kernels import reference

BLOCK_H = 16  # heads per program (tl.dot needs >= 16 rows; extra heads are masked)
BLOCK_N = 16  # cached tokens per inner step (fp32 tiles: 32 would need 108 KB smem, > sm_89)
NUM_STAGES = 2  # software-pipelined cache tiles: 3 stages of fp32 [16, 576] exceed sm_89's 99 KB
MAX_SPLITS = 64
TOKENS_PER_SPLIT = 256  # default split: about this many cached tokens per program
SMEM_BYTES = 227 * 1024
CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _mla_split_kernel(ql_ptr, qr_ptr, kv_ptr, kr_ptr, len_ptr, start_ptr, idx_ptr, o_ptr, lse_ptr, H, K, scale,
                      stride_qlb, stride_qlh, stride_qrb, stride_qrh,
                      stride_kvb, stride_kvs, stride_krb, stride_krs, stride_ib,
                      stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                      C: tl.constexpr, R: tl.constexpr, NUM_SPLITS: tl.constexpr, SPARSE: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax of BLOCK_H heads over one split of one sequence's keys: a chunk of its cache
    (dense) or a chunk of the cache rows it selected (SPARSE, DeepSeek-V3.2's DSA).

    Pointers (unit stride on the last dimension everywhere):
        ql_ptr: [B, H, C] q_lat; qr_ptr: [B, H, R] q_rope (any float dtype).
        kv_ptr: [B, S, C] latent cache; kr_ptr: [B, S, R] rope keys (views of one cache are fine).
        len_ptr: [B] int valid lengths; start_ptr: [B] int first valid position (left padding);
            both read only when dense.
        idx_ptr: [B, K] int row positions in [0, S), -1 = no key; read only when SPARSE.
        o_ptr: [B, H, NUM_SPLITS, C] fp32 partial outputs (softmax-normalised within the split).
        lse_ptr: [B, H, NUM_SPLITS] fp32 log-sum-exp of the split's scaled scores (-inf if no key).
    Grid: (B, cdiv(H, BLOCK_H), NUM_SPLITS). The key slots [first, last) — cache positions
    [start, len) when dense, index slots [0, K) when SPARSE — are cut into NUM_SPLITS chunks of
    cdiv(cdiv(last - first, NUM_SPLITS), BLOCK_N)·BLOCK_N slots.
    """
    b = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # (BH,)
    split = tl.program_id(2)
    mask_h = heads < H
    if SPARSE:
        first = 0
        last = K
    else:
        first = tl.load(start_ptr + b)
        last = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(last - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = first + split * chunk
    end = tl.minimum(start + chunk, last)
    offs_c = tl.arange(0, C)
    offs_r = tl.arange(0, R)
    q_lat, q_rope, m_i, l_i, acc = start_heads(ql_ptr + b * stride_qlb + heads[:, None] * stride_qlh + offs_c[None, :],
                                               qr_ptr + b * stride_qrb + heads[:, None] * stride_qrh + offs_r[None, :],
                                               mask_h, BLOCK_H, C)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # (BN,) key slots
        if SPARSE:  # gather: the slots hold row positions
            pos = tl.load(idx_ptr + b * stride_ib + offs_n, mask=offs_n < end, other=-1).to(tl.int64)  # (BN,)
            valid = pos >= 0
        else:
            pos = offs_n
            valid = offs_n < end
        c = tl.load(kv_ptr + b * stride_kvb + pos[:, None] * stride_kvs + offs_c[None, :],
                    mask=valid[:, None], other=0.0).to(tl.float32)  # (BN, C)
        kr = tl.load(kr_ptr + b * stride_krb + pos[:, None] * stride_krs + offs_r[None, :],
                     mask=valid[:, None], other=0.0).to(tl.float32)  # (BN, R)
        m_i, l_i, acc = attend_tile(q_lat, q_rope, c, kr, valid, scale, m_i, l_i, acc)
    o, lse = finish_split(acc, l_i, m_i)
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_c[None, :],
             o, mask=mask_h[:, None])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def start_heads(ql_ptrs, qr_ptrs, mask_h, BLOCK_H: tl.constexpr, C: tl.constexpr):
    """A program's queries and empty softmax state: q_lat (BH, C) and q_rope (BH, R) loaded at
    ql_ptrs / qr_ptrs as fp32 (heads past H read 0), running max -inf, sum 0, output 0."""
    q_lat = tl.load(ql_ptrs, mask=mask_h[:, None], other=0.0).to(tl.float32)  # (BH, C)
    q_rope = tl.load(qr_ptrs, mask=mask_h[:, None], other=0.0).to(tl.float32)  # (BH, R)
    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, C), dtype=tl.float32)
    return q_lat, q_rope, m_i, l_i, acc


@triton.jit
def attend_tile(q_lat, q_rope, c, kr, valid, scale, m_i, l_i, acc):
    """One online-softmax step of BLOCK_H heads over a tile of BLOCK_N keys (shared by the dense and
    the sparse decode kernels).

    q_lat (BH, C), q_rope (BH, R), c (BN, C) latents (keys and values), kr (BN, R) rope keys, all
    fp32; valid (BN,) which tile rows are keys; running max m_i (BH,), sum l_i (BH,), output acc
    (BH, C). Returns the updated (m_i, l_i, acc). A tile without a valid key changes nothing.
    """
    s = tl.dot(q_lat, tl.trans(c), input_precision="ieee")  # (BH, BN)
    s = (s + tl.dot(q_rope, tl.trans(kr), input_precision="ieee")) * scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # still -inf after keyless tiles: no NaN
    alpha = tl.exp(m_i - m_use)  # 0 while m_i = -inf
    p = tl.exp(s - m_use[:, None])  # (BH, BN), 0 off the valid rows
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, c, input_precision="ieee")  # (BH, C)
    return m_new, l_i, acc


@triton.jit
def finish_split(acc, l_i, m_i):
    """A split's normalised output acc / l_i (BH, C) and its log-sum-exp (BH,); a split that saw no
    key gives zeros and -inf."""
    nonempty = l_i > 0
    o = tl.where(nonempty[:, None], tl.math.div_rn(acc, tl.where(nonempty, l_i, 1.0)[:, None]), 0.0)
    lse = tl.where(nonempty, m_i + tl.log(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    return o, lse


@triton.jit
def _mla_combine_kernel(o_part_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps,
                        stride_lb, stride_lh, stride_ob, stride_oh,
                        C: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr):
    """out[b, h] = Σ_s w_s·o_s / Σ_s w_s with w_s = exp(lse_s − max lse) (empty chunks weigh 0).

    Pointers: o_part_ptr [B, H, NUM_SPLITS, C] fp32, lse_ptr [B, H, NUM_SPLITS] fp32,
    out_ptr [B, H, C] fp32. Grid: (B, H).
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    mask_s = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - m), 0.0)  # (S,)
    offs_c = tl.arange(0, C)
    o = tl.load(o_part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_c[None, :],
                mask=mask_s[:, None], other=0.0)  # (S, C)
    out = tl.math.div_rn(tl.sum(o * w[:, None], axis=0), tl.sum(w, axis=0))
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out)


def check_operands(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor) -> None:
    """What the split kernel needs beyond the reference's shape checks (dense and sparse alike):
    power-of-two C and R, a supported float dtype and a unit last stride everywhere, and a BLOCK_N
    tile of cache rows that fits in shared memory."""
    c, r = q_lat.shape[2], q_rope.shape[2]
    if not (is_pow2(c) and is_pow2(r)):
        raise ValueError(f"q_lat/q_rope: C={c} and R={r} must be powers of two")
    for name, t in (("q_lat", q_lat), ("q_rope", q_rope), ("kv", kv), ("k_rope", k_rope)):
        if t.dtype not in CACHE_DTYPES:
            raise ValueError(f"{name}: expected one of {CACHE_DTYPES}, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous")
    smem = BLOCK_N * (c + r) * 4  # a lower bound; gpu_compile.py builds the real cubin
    if smem > SMEM_BYTES:
        raise ValueError(f"kv: a {BLOCK_N}-token fp32 tile of width {c + r} needs {smem} B of shared memory")


def run_splits(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, scale: float,
               splits: int, *, lens: torch.Tensor | None = None, starts: torch.Tensor | None = None,
               indices: torch.Tensor | None = None) -> torch.Tensor:
    """Launch `_mla_split_kernel` and `_mla_combine_kernel` on checked operands.

    Args:
        q_lat, q_rope, kv, k_rope, scale: as `mla_decode`.
        splits: key chunks per (sequence, head block), >= 1.
        lens, starts: [B] int32 key range [start, len) per row (dense); both or neither.
        indices: [B, K] int row positions, -1 = no key (sparse); instead of lens / starts.

    Returns:
        o_lat [B, H, C] fp32.
    """
    if splits < 1:
        raise ValueError(f"num_splits: expected >= 1, got {splits}")
    b, h, c = q_lat.shape
    r = q_rope.shape[2]
    out = torch.empty((b, h, c), dtype=torch.float32, device=q_lat.device)  # (B, H, C)
    if b == 0 or h == 0:
        return out
    sparse = indices is not None
    if sparse:
        indices = indices.to(device=q_lat.device).contiguous()  # (B, K), int32 or int64 as given
        lens = starts = indices  # not read
    else:
        indices = lens  # not read
    o_part = torch.empty((b, h, splits, c), dtype=torch.float32, device=q_lat.device)  # (B, H, S, C)
    lse = torch.empty((b, h, splits), dtype=torch.float32, device=q_lat.device)  # (B, H, S)
    _mla_split_kernel[(b, triton.cdiv(h, BLOCK_H), splits)](
        q_lat, q_rope, kv, k_rope, lens, starts, indices, o_part, lse, h, indices.shape[-1] if sparse else 0,
        float(scale), q_lat.stride(0), q_lat.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv.stride(0), kv.stride(1), k_rope.stride(0), k_rope.stride(1), indices.stride(0) if sparse else 0,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        C=c, R=r, NUM_SPLITS=splits, SPARSE=sparse, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, num_stages=NUM_STAGES)
    _mla_combine_kernel[(b, h)](
        o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        C=c, NUM_SPLITS=splits, SPLITS_P2=triton.next_power_of_2(splits))
    return out


def default_num_splits(max_len: int) -> int:
    """About TOKENS_PER_SPLIT cached tokens per program, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, math.ceil(max_len / TOKENS_PER_SPLIT)))


def mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
               cache_seqlens: torch.Tensor, scale: float, num_splits: int | None = None,
               cache_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode, split-K flash-decoding (Triton).

    Args:
        q_lat: [B, H, C] absorbed query (q_nope·W_UK); C = kv_lora_rank, a power of two.
        q_rope: [B, H, R] rotated rope query; R a power of two.
        kv: [B, S, C] latent cache (a view [..., :C] of a [B, S, C+R] cache is fine).
        k_rope: [B, S, R] rope keys (e.g. the view [..., C:]).
        cache_seqlens: [B] int valid lengths in [1, S].
        scale: softmax scale.
        num_splits: sequence chunks per (sequence, head block); default from the longest length.
        cache_starts: optional [B] int first valid position per row (default 0): a left-padded
            ragged batch attends over [start, len) of each row.

    Returns:
        o_lat [B, H, C] fp32.
    """
    reference.check_mla_inputs(q_lat, q_rope, kv, k_rope, cache_seqlens, cache_starts)
    check_operands(q_lat, q_rope, kv, k_rope)
    if q_lat.shape[0] == 0:  # no rows: nothing to launch
        return q_lat.new_empty(q_lat.shape, dtype=torch.float32)  # (0, H, C)
    splits = num_splits if num_splits is not None else default_num_splits(int(cache_seqlens.max()))
    lens = cache_seqlens.to(device=q_lat.device, dtype=torch.int32)
    starts = (torch.zeros_like(lens) if cache_starts is None
              else cache_starts.to(device=q_lat.device, dtype=torch.int32))  # (B,)
    return run_splits(q_lat, q_rope, kv, k_rope, scale, splits, lens=lens, starts=starts)
