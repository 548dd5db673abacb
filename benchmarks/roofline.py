"""Roofline yardsticks for the DeepSeek-V3 / V3.2 kernels, on paper only (published H100/H200 peaks).

roofline floor = max(bytes / bandwidth, flops / peak). These numbers describe an H100 SXM; they
are never "measured" here. bench_kernels.py divides a measured GPU time into them (% of floor).
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 128
FP8_BYTES = 1
BF16_BYTES = 2
FP32_BYTES = 4


@dataclass(frozen=True)
class Device:
    """Paper peaks of one accelerator."""

    name: str
    fp8_tflops: float
    bf16_tflops: float
    hbm_tbps: float
    sms: int


H100_SXM = Device("H100 SXM", fp8_tflops=1979.0, bf16_tflops=989.0, hbm_tbps=3.35, sms=132)
H200 = Device("H200", fp8_tflops=1979.0, bf16_tflops=989.0, hbm_tbps=4.8, sms=132)

# (name, N, K) of every DeepSeek-V3 projection GEMM, C[M, N] = A[M, K]·W[N, K]ᵀ
V3_GEMM_SHAPES = (
    ("q_a+kv_a", 2112, 7168),
    ("q_b", 24576, 1536),
    ("kv_b", 32768, 512),
    ("o_proj", 7168, 16384),
    ("expert gate+up", 4096, 7168),
    ("expert down", 7168, 2048),
    ("dense gate+up", 36864, 7168),
    ("dense down", 7168, 18432),
)
V3_M_VALUES = (1, 16, 64, 128, 4096)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_flops(m: int, n: int, k: int) -> float:
    """Multiply-adds counted as 2 flops."""
    return 2.0 * m * n * k


def fp8_gemm_bytes(m: int, n: int, k: int) -> float:
    """Compulsory HBM traffic of the block-fp8 GEMM with bf16 output (A, W and their fp32 scales read once, C written once)."""
    kb = _cdiv(k, BLOCK)
    return (m * k * FP8_BYTES + FP32_BYTES * m * kb + n * k * FP8_BYTES
            + FP32_BYTES * _cdiv(n, BLOCK) * kb + BF16_BYTES * m * n)


def bf16_gemm_bytes(m: int, n: int, k: int) -> float:
    """Compulsory traffic of a bf16 F.linear (the peer in the same table)."""
    return BF16_BYTES * (m * k + n * k + m * n)


def act_quant_bytes(m: int, k: int, in_bytes: int = BF16_BYTES) -> float:
    """Read x, write fp8 y and fp32 scales."""
    return m * k * in_bytes + m * k * FP8_BYTES + FP32_BYTES * m * _cdiv(k, BLOCK)


def floor_seconds(flops: float, nbytes: float, peak_tflops: float, hbm_tbps: float) -> float:
    """max(bytes / bandwidth, flops / peak)."""
    return max(nbytes / (hbm_tbps * 1e12), flops / (peak_tflops * 1e12))


def fp8_gemm_floor(m: int, n: int, k: int, dev: Device = H100_SXM) -> float:
    """Roofline floor in seconds of the block-fp8 GEMM on `dev`."""
    return floor_seconds(gemm_flops(m, n, k), fp8_gemm_bytes(m, n, k), dev.fp8_tflops, dev.hbm_tbps)


def bf16_gemm_floor(m: int, n: int, k: int, dev: Device = H100_SXM) -> float:
    """Roofline floor in seconds of the bf16 GEMM on `dev`."""
    return floor_seconds(gemm_flops(m, n, k), bf16_gemm_bytes(m, n, k), dev.bf16_tflops, dev.hbm_tbps)


def is_memory_bound(m: int, n: int, k: int, dev: Device = H100_SXM) -> bool:
    """True when bytes/bandwidth dominates flops/peak for the fp8 GEMM."""
    return fp8_gemm_bytes(m, n, k) / (dev.hbm_tbps * 1e12) >= gemm_flops(m, n, k) / (dev.fp8_tflops * 1e12)


def moe_bytes(tokens: int, topk: int, n_experts: int, hidden: int, inter: int) -> float:
    """Fused-MoE traffic: fp8 weights of the experts actually hit, plus activations in and out."""
    hit = min(n_experts, tokens * topk)
    w = hit * (3 * inter * hidden * FP8_BYTES + FP32_BYTES * (_cdiv(2 * inter, BLOCK) * _cdiv(hidden, BLOCK)
                                                             + _cdiv(hidden, BLOCK) * _cdiv(inter, BLOCK)))
    return w + tokens * hidden * (BF16_BYTES + BF16_BYTES)


def moe_flops(tokens: int, topk: int, hidden: int, inter: int) -> float:
    """gate‖up (2I×H) and down (H×I) for every routed (token, expert) pair."""
    return 2.0 * tokens * topk * 3 * inter * hidden


def mla_decode_bytes(batch: int, seq: int, heads: int, kv_dim: int = 576, v_dim: int = 512,
                     cache_bytes: int = BF16_BYTES) -> float:
    """The latent cache is read once per sequence (shared by all heads); q in, o_lat out."""
    return batch * (seq * kv_dim * cache_bytes + heads * (kv_dim + v_dim) * BF16_BYTES)


def index_logits_bytes(batch: int, tokens: int, keys: int, heads: int = 64, dim: int = 128,
                       in_bytes: int = FP8_BYTES) -> float:
    """Compulsory traffic of the lightning-indexer logits (DeepSeek-V3.2), each operand once.

    Per sequence: q [T, H, D] (fp8) with fp32 scales [T, H] and fp32 head weights [T, H]; k [S, D]
    (fp8) with fp32 scales [S]; fp32 logits [T, S] written. The kernel rereads k once per query
    token; those rereads are not compulsory (L2 serves them when S·D fits), so they are not counted.

    Args:
        batch: sequences B; tokens: query tokens T per sequence; keys: keys S per sequence.
        heads: index heads H; dim: head width D.
        in_bytes: bytes of one q or k element (fp8: 1).
    """
    q = tokens * heads * (dim * in_bytes + 2 * FP32_BYTES)  # q, q_scale, weights
    k = keys * (dim * in_bytes + FP32_BYTES)  # k, k_scale
    return batch * (q + k + FP32_BYTES * tokens * keys)


def index_logits_flops(batch: int, tokens: int, keys: int, heads: int = 64, dim: int = 128) -> float:
    """The q·k dots of every (token, head, key), multiply-adds counted as 2 flops (ReLU and head sum not counted)."""
    return 2.0 * batch * tokens * keys * heads * dim


def sparse_mla_decode_bytes(batch: int, topk: int, heads: int, kv_dim: int = 576, v_dim: int = 512,
                            cache_bytes: int = BF16_BYTES, index_bytes: int = 8, q_bytes: int = BF16_BYTES,
                            out_bytes: int = FP32_BYTES) -> float:
    """Compulsory traffic of absorbed-MLA decode over the top-k selected cache rows (DeepSeek-V3.2 DSA).

    Per sequence: the `topk` selected latent rows [C+R] gathered once (shared by all heads; -1
    slots are counted as rows), the index list [K], q [H, C+R] in and o_lat [H, C] out. The
    split-K partial outputs are an implementation choice, not compulsory, and are not counted.

    Args:
        batch: sequences B; topk: selected rows K per sequence; heads: query heads H.
        kv_dim: C + R; v_dim: C.
        cache_bytes, index_bytes, q_bytes, out_bytes: element sizes (bf16 cache, int64 indices, bf16 q,
            fp32 o_lat by default).
    """
    return batch * (topk * (kv_dim * cache_bytes + index_bytes) + heads * (kv_dim * q_bytes + v_dim * out_bytes))
