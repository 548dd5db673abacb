"""Roofline yardsticks for the DeepSeek-V3 kernels, on paper only (published H100/H200 peaks).

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
    """Compulsory HBM traffic of the block-fp8 GEMM with bf16 output (FACTS §4 formula)."""
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
