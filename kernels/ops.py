"""THE dispatch point for every projection and FP8 op the model runs.

Each op takes an explicit `backend`: "torch" (the pure-torch twin in reference.py, any device),
"triton" (the Triton kernels; on CPU tensors only under TRITON_INTERPRET=1), or "auto" (Triton on
a CUDA device of compute capability >= 8.9, else torch).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from deepseek_model.kernels import reference
from deepseek_model.kernels.cpu_pack import PackedWeight

BACKENDS = ("auto", "torch", "triton")
FP8_DTYPE = reference.FP8_DTYPE
# CPU float32 decoding: with 2–4 rows, y = x·Wᵀ runs as W·Xᵀ (Xᵀ a transposed view). A GEMM with a
# narrow right-hand side streams W once; the x·Wᵀ layout of 2–4 rows measured 1.0–1.8x slower on
# weights that are not in cache (1 thread, fp32, shapes 80x256 to 4096x256), and from 8 rows on it
# is the faster one. A single row pays for padding to two, which only wins on weights of at least
# NARROW_MIN_WEIGHT elements (768x256 and up). bfloat16 stays on F.linear: there W·Xᵀ measured 1.8x
# slower at 1–4 rows (1 thread, 1024x1024: 5.3 vs 9.6 GB/s).
CPU_NARROW_ROWS = 4
INVARIANT_ROWS = 1  # batch-invariant mode: every GEMM runs one row at a time (a row's place in a
# multi-row tile changed its rounding in MKL for odd widths, measured), always with the same kernel
NARROW_MIN_COLS = 2
NARROW_MIN_WEIGHT = 3 * 2**16  # elements: one-row products of smaller weights stay on F.linear


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """Map "auto" to a concrete backend for `device`; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if backend == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                         "(set before triton is imported)")
    if backend != "auto":
        return backend
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(dev) >= (8, 9):
        return "triton"
    return "torch"


def _triton_ops():
    from deepseek_model.kernels import triton_ops  # noqa: PLC0415 (imported only when asked for)

    return triton_ops


def act_quant(x: torch.Tensor, block_size: int = reference.BLOCK, scale_fmt: str | None = None,
              backend: str = "torch", column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token per-128-channel fp8 quantization; see reference.act_quant."""
    if resolve_backend(backend, x.device) == "triton":
        return _triton_ops().act_quant(x, block_size, scale_fmt, column_major_scales=column_major_scales)
    return reference.act_quant(x, block_size, scale_fmt, column_major_scales=column_major_scales)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = reference.BLOCK,
                   dtype: torch.dtype = torch.float32, backend: str = "torch") -> torch.Tensor:
    """128×128 block dequantization; see reference.weight_dequant."""
    if resolve_backend(backend, w.device) == "triton":
        return _triton_ops().weight_dequant(w, s, block_size, dtype)
    return reference.weight_dequant(w, s, block_size, dtype)


def weight_quant(w: torch.Tensor, block_size: int = reference.BLOCK,
                 scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 block quantization (checkpoint formula); torch only (an offline op)."""
    return reference.weight_quant(w, block_size, scale_fmt)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block_size: int = reference.BLOCK,
             backend: str = "torch") -> torch.Tensor:
    """C = A·Wᵀ over fp8 operands with block scales; see reference.fp8_gemm."""
    if resolve_backend(backend, a.device) == "triton":
        return _triton_ops().fp8_gemm(a, a_s, w, w_s, out_dtype, block_size)
    return reference.fp8_gemm(a, a_s, w, w_s, out_dtype, block_size)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, backend: str = "torch", block_size: int = reference.BLOCK,
           scale_fmt: str | None = None, w8a8: bool = True, row_tile: int | None = None,
           packed: PackedWeight | None = None) -> torch.Tensor:
    """y = x·Wᵀ (+ bias), the single choke point of every projection.

    The weight's dtype decides the path: a float8_e4m3fn weight (with its block `scale`) runs
    W8A8 — act_quant then fp8_gemm with fp32 accumulation — or, with `w8a8=False`, weight-only:
    the weight is dequantized into x.dtype for this GEMM (the official `gemm_impl="bf16"`
    numerics; FP8 stays the storage). Any other weight runs F.linear in x.dtype.

    Args:
        x: [..., K] activations.
        weight: [N, K] weight (float or float8_e4m3fn).
        scale: [ceil(N/b), ceil(K/b)] fp32 scale_inv, required for fp8 weights.
        bias: optional [N].
        backend: "torch" | "triton" | "auto".
        block_size: quantization block.
        scale_fmt: activation scale format (None or "ue8m0").
        w8a8: for an fp8 weight, quantize the activations too (else dequantize the weight).
        row_tile: batch-invariant mode: rows go through GEMMs of exactly this many rows (the last
            tile zero-padded), so a row's result never depends on how many rows came with it.
        packed: a oneDNN-blocked copy of this float weight (kernels.cpu_pack); used where it
            serves x (CPU, same dtype, enough rows, weight unchanged since packing, no gradient
            needed, no row_tile), else the weight itself is used.

    Returns:
        [..., N] in x.dtype.
    """
    if not x.dtype.is_floating_point or x.dtype == FP8_DTYPE:
        raise ValueError(f"linear: x must be a float tensor, got {x.dtype}")
    if weight.dtype == FP8_DTYPE and scale is None:
        raise ValueError("linear: an fp8 weight needs its block scale")
    if row_tile is not None:
        if isinstance(row_tile, bool) or not isinstance(row_tile, int) or row_tile < 1:
            raise ValueError(f"linear: row_tile must be a positive integer or None, got {row_tile!r}")
        return _tiled_linear(x, weight, scale, bias, backend, block_size, scale_fmt, w8a8, row_tile)
    if weight.dtype == FP8_DTYPE and not w8a8:
        if scale is None:
            raise ValueError("linear: an fp8 weight needs its block scale")
        weight = weight_dequant(weight, scale, block_size, x.dtype)  # (N, K) for this GEMM only
    if weight.dtype != FP8_DTYPE:
        if packed is not None and packed.serves(x, weight):
            return packed.linear(x, bias)
        w = weight.to(x.dtype)
        rows = x.numel() // max(x.shape[-1], 1)
        narrow = 0 < rows <= CPU_NARROW_ROWS and (rows > 1 or w.numel() >= NARROW_MIN_WEIGHT)
        if narrow and x.device.type == "cpu" and x.dtype == torch.float32:
            return _narrow_linear(x, w, bias)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    if scale is None:
        raise ValueError("linear: an fp8 weight needs its block scale")
    *lead, k = x.shape
    a, a_s = act_quant(x.reshape(-1, k), block_size, scale_fmt, backend=backend)  # (M, K), (M, KB)
    y = fp8_gemm(a, a_s, weight, scale, torch.float32, block_size, backend=backend)  # (M, N)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


def rowwise(fn, x: torch.Tensor, invariant: bool) -> torch.Tensor:
    """fn(x) for an elementwise op; in batch-invariant mode one row ([..., D] slices) at a time.

    A vectorized transcendental (exp in silu, sigmoid, cos/sin) rounds a value differently when it
    falls in the scalar tail of a loop, and where the tail falls depends on how many rows come with
    it; applied per row, each row is computed exactly as it would be alone.
    """
    if not invariant:
        return fn(x)
    rows = x.reshape(-1, x.shape[-1])  # (M, D)
    return torch.cat([fn(rows[i:i + 1]) for i in range(rows.shape[0])]).reshape(x.shape) if rows.shape[0] else fn(x)


def _tiled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                  backend: str, block_size: int, scale_fmt: str | None, w8a8: bool, tile: int) -> torch.Tensor:
    """`linear` over fixed-shape row tiles: every tile is a (tile, K) GEMM, whatever M is, so each
    row meets the same kernel and reduction order alone, in a batch, or in a chunk."""
    *lead, k = x.shape
    rows = x.reshape(-1, k)  # (M, K)
    m = rows.shape[0]
    if weight.dtype == FP8_DTYPE and not w8a8:
        weight = weight_dequant(weight, scale, block_size, x.dtype)  # (N, K), once for all tiles
    outs = []
    for start in range(0, m, tile):
        part = rows[start:start + tile]  # (≤tile, K)
        n = part.shape[0]
        if n < tile:
            part = torch.cat([part, part.new_zeros(tile - n, k)])  # (tile, K)
        outs.append(linear(part, weight, scale, bias, backend, block_size, scale_fmt, w8a8)[:n])  # (n, N)
    out = torch.cat(outs) if outs else x.new_zeros(0, weight.shape[0])  # (M, N)
    return out.reshape(*lead, weight.shape[0])


def _narrow_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x·Wᵀ for a few rows on CPU, computed as (W·Xᵀ)ᵀ with X zero-padded to NARROW_MIN_COLS rows.

    Xᵀ is passed as the transposed view of a row-major (M', K) buffer: that operand layout is the
    fast one (a contiguous (K, M') operand measured ~4x slower).
    """
    *lead, k = x.shape
    rows = x.reshape(-1, k)  # (M, K)
    m = rows.shape[0]
    if m < NARROW_MIN_COLS:
        rows = torch.cat([rows, rows.new_zeros(NARROW_MIN_COLS - m, k)])  # (M', K)
    y = torch.mm(w, rows.T)[:, :m].T  # (N, M') → (M, N)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.contiguous().reshape(*lead, w.shape[0])


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor,
              block_size: int = reference.BLOCK, scale_fmt: str | None = None,
              backend: str = "torch") -> torch.Tensor:
    """Routed fp8 experts (gate‖up → SwiGLU → down, routed weights applied); see reference.fused_moe.

    Args:
        x: [T, H] activations.
        topk_weights: [T, topk] routing weights; topk_ids: [T, topk] int expert ids.
        w13: [E, 2I, H] fp8 gate rows then up rows, w13_s its [E, ⌈2I/b⌉, ⌈H/b⌉] fp32 scale_inv.
        w2: [E, H, I] fp8 down projection, w2_s its [E, ⌈H/b⌉, ⌈I/b⌉] fp32 scale_inv.
        block_size: quantization block.
        scale_fmt: activation scale format (None or "ue8m0").
        backend: "torch" | "triton" | "auto".

    Returns:
        [T, H] in x.dtype.
    """
    if resolve_backend(backend, x.device) == "triton":
        return _triton_ops().fused_moe(x, topk_weights, topk_ids, w13, w13_s, w2, w2_s, block_size, scale_fmt)
    return reference.fused_moe(x, topk_weights, topk_ids, w13, w13_s, w2, w2_s, block_size, scale_fmt)


def stack_experts(gate: list[tuple[torch.Tensor, torch.Tensor]], up: list[tuple[torch.Tensor, torch.Tensor]],
                  down: list[tuple[torch.Tensor, torch.Tensor]],
                  block_size: int = reference.BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert (fp8 weight, scale) pairs → the fused_moe layout; see reference.stack_experts."""
    return reference.stack_experts(gate, up, down, block_size)


def mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
               cache_seqlens: torch.Tensor, scale: float, backend: str = "torch",
               cache_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode over the latent cache; see reference.mla_decode.

    Args:
        q_lat: [B, H, C] absorbed query; q_rope: [B, H, R] rotated rope query.
        kv: [B, S, C] latent cache; k_rope: [B, S, R] rope keys.
        cache_seqlens: [B] int valid lengths (>= 1).
        scale: softmax scale.
        backend: "torch" | "triton" | "auto".
        cache_starts: optional [B] int first valid position per row (a left-padded ragged batch).

    Returns:
        o_lat [B, H, C] fp32.
    """
    if resolve_backend(backend, q_lat.device) == "triton":
        return _triton_ops().mla_decode(q_lat, q_rope, kv, k_rope, cache_seqlens, scale, cache_starts=cache_starts)
    return reference.mla_decode(q_lat, q_rope, kv, k_rope, cache_seqlens, scale, cache_starts)


def index_logits(q: torch.Tensor, q_scale: torch.Tensor | None, k: torch.Tensor, k_scale: torch.Tensor | None,
                 weights: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """DeepSeek-V3.2 lightning-indexer logits, unmasked; see reference.index_logits.

    Args:
        q: [B, T, H, D] float8_e4m3fn or float index queries.
        q_scale: [B, T, H] fp32 positive dequantization scales, or None (float q).
        k: [B, S, D] float8_e4m3fn or float index keys.
        k_scale: [B, S] fp32 positive dequantization scales, or None (float k).
        weights: [B, T, H] fp32 head weights (constant scalings folded in).
        backend: "torch" | "triton" | "auto".

    Returns:
        logits [B, T, S] fp32.
    """
    if resolve_backend(backend, q.device) == "triton":
        return _triton_ops().index_logits(q, q_scale, k, k_scale, weights)
    return reference.index_logits(q, q_scale, k, k_scale, weights)


def sparse_mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                      indices: torch.Tensor, scale: float, backend: str = "torch") -> torch.Tensor:
    """Absorbed MLA decode over the cache rows each sequence selected (DSA); see reference.sparse_mla_decode.

    Args:
        q_lat: [B, H, C] absorbed query; q_rope: [B, H, R] rotated rope query.
        kv: [B, S, C] latent cache; k_rope: [B, S, R] rope keys.
        indices: [B, K] int positions in [0, S), -1 = no key; every row has at least one valid entry.
        scale: softmax scale.
        backend: "torch" | "triton" | "auto".

    Returns:
        o_lat [B, H, C] fp32.
    """
    if resolve_backend(backend, q_lat.device) == "triton":
        return _triton_ops().sparse_mla_decode(q_lat, q_rope, kv, k_rope, indices, scale)
    return reference.sparse_mla_decode(q_lat, q_rope, kv, k_rope, indices, scale)
