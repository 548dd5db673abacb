"""One prepared GPU check: every Triton kernel against its torch twin and the roofline, in one command.

Real mode (a CUDA device of compute capability >= 8.9, TRITON_INTERPRET unset) runs, in order,
printing one progress line per section and rewriting the result files after each:
  1. correctness: every Triton kernel that kernels/ops.py dispatches to (act_quant, weight_dequant,
     fp8_gemm with and without split-K, fused_moe, mla_decode, and the DeepSeek-V3.2 sparse
     attention kernels index_logits and sparse_mla_decode) against its torch twin
     (kernels/reference.py) on the same GPU at DeepSeek-V3 / V3.2 shapes, ragged edges included
     (the 576-row kv_a weight, M = 1, 77, 4096; 4000 index keys; -1 padded top-k rows): bit-exact
     where the twin is exact (act_quant, weight_dequant), else max|kernel - twin| / max|twin|
     within the bounds below;
  2. with --tune: a small, time-bounded search over tile configs per (N, K, M bucket); a config
     that is faster than the table's by TUNE_MIN_GAIN and passes the twin check is written to the
     tile table (kernels/tiles.json layout) and used by the timings that follow;
  3. fp8_gemm at the V3 projection shapes and M values: TFLOP/s, % of the FP8 peak and % of the
     roofline floor max(bytes / HBM, flops / peak), next to torch._scaled_mm with blockwise scales
     (where the installed torch runs it, else "unsupported") and bf16 torch.matmul, same run;
  4. memory-bound kernels (act_quant, weight_dequant, fused_moe, mla_decode, index_logits,
     sparse_mla_decode): GB/s vs HBM (fused_moe and index_logits also TFLOP/s and % of the floor).
GPU timings are triton.testing.do_bench medians (CUDA events, L2 flushed between repetitions).
Results: OUT/<device-name-slug>.json and .md (default OUT benchmarks/results/gpu).

--smoke runs the same code on CPU tensors in the Triton interpreter at tiny shapes: correctness
and the result files. Its timings are CPU wall-clock (time.perf_counter), labelled so, and are
never GPU figures; no rate or % figure is derived from them.

Exit status: 0 everything ran and passed; 1 a correctness check failed; 2 refused (no CUDA device,
TRITON_INTERPRET set for the GPU run, a bad option); 3 passed, but the time budget skipped items.

Usage: python -m deepseek_model.benchmarks.gpu_check [--tune] [--out DIR] [--max-seconds S] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple

import torch

from deepseek_model.benchmarks import roofline
from deepseek_model.benchmarks.bench_kernels import rel_err, table, time_cpu, time_gpu, versions
from deepseek_model.commands.parser import Parser
from deepseek_model.kernels import reference, tiles

BLOCK = reference.BLOCK
DEFAULT_OUT = "benchmarks/results/gpu"
DEFAULT_MAX_SECONDS = 450.0  # no item starts after this; with start-up and the last item, under 8 minutes
DEFAULT_TUNE_SECONDS = 180.0
MIN_CAPABILITY = (8, 9)  # fp8 tl.dot
EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INCOMPLETE = 0, 1, 2, 3
SMOKE_TRIALS = 1
TUNE_MIN_GAIN = 0.03  # a searched config replaces the table's only when at least 3 % faster
NOTE_CHARS = 160  # an exception message is cut to this many characters in the report
SMOKE_DEVICE_NAME = "CPU (Triton interpreter)"
TUNED_NOTE = ("'shapes' entries listed in 'entries' were measured fastest by "
              "`python -m deepseek_model.benchmarks.gpu_check --tune`; all others are hand-written")

# Correctness bounds. Metric: max|kernel - twin| / max|twin|, the twin computed in fp32 on the same
# device from the same fp8 operands.
# fp8 tensor-core products are exact, but an fp8 MMA on Hopper accumulates with fewer than fp32's
# significant bits (about 14); the kernel promotes each 128-wide K block into fp32 with its scales,
# so the error stays near 2^-14 of a block sum per block; 2^-9 leaves a wide margin and still
# catches a lost K block, a wrong scale or a wrong edge tile (errors of 1e-2 and more).
GEMM_ACC_BOUND = 2.0 ** -9
BF16_OUT_BOUND = 2.0 ** -8  # a bf16 output adds at most half a bf16 ulp, <= 2^-8 of |value| (8 significant bits)
# W8A8 twice: a summation-order difference in gate/up can flip the e4m3 rounding of a SwiGLU output
# (one e4m3 step is 2^-3 relative) before the down projection; a wrong expert, routed weight or
# scale gives errors of order 1.
MOE_BOUND = 5e-2
MLA_BOUND = 1e-4  # fp32 math with IEEE dots: only summation order and exp differ (sparse_mla_decode too)
# index_logits: fp8 products are exact as well, but the whole D = 128 dot is one K block with no fp32
# promotion, so its error is the fp8 MMA's own (about 2^-14 of the largest partial sum); the head
# sum Σ_h w·ReLU(dot) with mixed-sign weights then cancels, which magnifies it relative to
# max|twin|. A CPU model of a truncating 14-bit accumulator (per 32-deep MMA step) on the GPU plan's
# inputs gives 2^-12.3..2^-12.9 (13 bits: 2^-10.5..2^-11.4; 12 bits: 2^-9.4..2^-10); 2^-8 leaves
# room for that and still catches one lost head of 64 (2^-1.3 on these inputs), a lost key tile,
# a wrong scale or a wrong edge (errors of 1e-2 and more).
INDEX_ACC_BOUND = 2.0 ** -8
EXACT = "bit-exact"

# Triton kernel (a @triton.jit function launched from kernels/) -> the correctness ops that launch it
KERNELS = (
    ("_act_quant_kernel", "act_quant"),
    ("_weight_dequant_kernel", "weight_dequant"),
    ("_fp8_gemm_kernel", "fp8_gemm"),
    ("_splitk_reduce_kernel", "fp8_gemm split-K"),
    ("_moe_gemm_kernel", "fused_moe"),
    ("_silu_mul_quant_kernel", "fused_moe"),
    ("_mla_split_kernel", "mla_decode"),
    ("_mla_combine_kernel", "mla_decode"),
    ("_index_logits_kernel", "index_logits"),
    ("_mla_split_kernel", "sparse_mla_decode"),  # its SPARSE form
)
# device-name substring -> paper peaks; names with a NOT_LISTED marker have other peaks
DEVICE_PEAKS = (("H200", roofline.H200), ("H100", roofline.H100_SXM))
NOT_LISTED = ("PCIE", "NVL", "GH200")


class AqCase(NamedTuple):
    """One act_quant check: x [m, k] of `dtype`."""

    m: int
    k: int
    dtype: torch.dtype = torch.bfloat16
    scale_fmt: str | None = None
    column_major: bool = False


class GemmCase(NamedTuple):
    """One fp8_gemm check; split_k > 0 forces that split on the table's tile."""

    name: str
    n: int
    k: int
    m: int
    bf16_out: bool = False
    split_k: int = 0
    column_major: bool = False


class MoeShape(NamedTuple):
    """Routed experts: E experts, top-k, hidden H, intermediate I."""

    experts: int
    topk: int
    hidden: int
    inter: int


class MlaShape(NamedTuple):
    """Absorbed MLA decode: heads, kv_lora_rank C and rope width R."""

    heads: int
    rank: int
    rope: int


class MlaCase(NamedTuple):
    """One mla_decode check: a cache of `seq` positions, per-sequence valid lengths."""

    seq: int
    lens: tuple[int, ...]
    dtype: torch.dtype = torch.bfloat16


class IndexShape(NamedTuple):
    """Lightning indexer: index heads H and head width D (fp8 q/k, one fp32 scale per D-row)."""

    heads: int
    dim: int


class IndexCase(NamedTuple):
    """One index_logits check or timing: `batch` sequences of `tokens` queries against `keys` keys."""

    tokens: int
    keys: int
    batch: int = 1


class SparseCase(NamedTuple):
    """One sparse_mla_decode check or timing (C and R from the plan's MlaShape).

    `batch` sequences with a `seq`-row cache each select `topk` distinct rows (ascending, as the
    indexer returns them); row 0 starts with `pad` -1 entries (a sequence shorter than top-k).
    splits: the kernel's num_splits, None for its default.
    """

    heads: int
    batch: int
    seq: int
    topk: int
    pad: int = 0
    splits: int | None = None
    dtype: torch.dtype = torch.bfloat16


@dataclass(frozen=True)
class Plan:
    """Every shape one mode runs: GPU_PLAN at DeepSeek-V3 / V3.2 sizes, SMOKE_PLAN tiny for the interpreter."""

    act_quant: tuple[AqCase, ...]
    dequant: tuple[tuple[str, int, int], ...]  # (name, N, K), dequantized to fp32 and bf16
    gemm: tuple[GemmCase, ...]
    moe: MoeShape
    moe_check_tokens: tuple[int, ...]
    mla: MlaShape
    mla_checks: tuple[MlaCase, ...]
    index: IndexShape
    index_checks: tuple[IndexCase, ...]
    sparse_checks: tuple[SparseCase, ...]
    gemm_perf: tuple[tuple[str, int, int], ...]  # (name, N, K) timed at every gemm_perf_m
    gemm_perf_m: tuple[int, ...]
    act_quant_perf: tuple[tuple[int, int], ...]  # (M, K), bf16 input
    dequant_perf: tuple[tuple[int, int], ...]  # (N, K), bf16 output
    moe_perf_tokens: tuple[int, ...]
    mla_perf: tuple[tuple[int, int], ...]  # (batch, seq), bf16 cache
    index_perf: tuple[IndexCase, ...]
    sparse_perf: tuple[SparseCase, ...]
    tune_shapes: tuple[tuple[str, int, int], ...]
    tune_space: tuple[tuple[str, int, tuple[tuple[str, tuple[int, ...]], ...]], ...]  # (bucket, M, fields)


def _gemm_grid(shapes: tuple[tuple[str, int, int], ...], ms: tuple[int, ...],
               bf16_names: tuple[str, ...]) -> tuple[GemmCase, ...]:
    """fp32-output checks at every (shape, M), plus bf16 output for the named shapes."""
    cases = [GemmCase(name, n, k, m) for name, n, k in shapes for m in ms]
    return tuple(cases + [GemmCase(name, n, k, m, bf16_out=True) for name, n, k in shapes
                          if name in bf16_names for m in ms])


V3_CHECK_SHAPES = (("kv_a", 576, 7168), ("q_a+kv_a", 2112, 7168), ("q_b", 24576, 1536),
                   ("expert down", 7168, 2048), ("ragged K", 576, 1600))
GPU_TUNE_SPACE = (
    ("m16", 16, (("BLOCK_M", (16,)), ("BLOCK_N", (64, 128)), ("GROUP_M", (1,)), ("SPLIT_K", (1, 2, 4, 8)),
                 ("num_warps", (4,)), ("num_stages", (3, 4)))),
    ("m32", 32, (("BLOCK_M", (32,)), ("BLOCK_N", (64, 128)), ("GROUP_M", (1,)), ("SPLIT_K", (1, 2, 4)),
                 ("num_warps", (4,)), ("num_stages", (3, 4)))),
    ("m64", 64, (("BLOCK_M", (64,)), ("BLOCK_N", (64, 128)), ("GROUP_M", (1,)), ("SPLIT_K", (1, 2, 4)),
                 ("num_warps", (4,)), ("num_stages", (3, 4)))),
    ("m128", 128, (("BLOCK_M", (64, 128)), ("BLOCK_N", (128,)), ("GROUP_M", (8,)), ("SPLIT_K", (1, 2)),
                   ("num_warps", (4, 8)), ("num_stages", (3,)))),
    ("large", 4096, (("BLOCK_M", (128,)), ("BLOCK_N", (128, 256)), ("GROUP_M", (8,)), ("SPLIT_K", (1,)),
                     ("num_warps", (8,)), ("num_stages", (3, 4)))),
)
GPU_PLAN = Plan(
    act_quant=(AqCase(1, 7168), AqCase(77, 7168), AqCase(4096, 7168), AqCase(77, 7168, scale_fmt="ue8m0"),
               AqCase(4096, 7168, scale_fmt="ue8m0"), AqCase(77, 7168, torch.float32), AqCase(77, 576),
               AqCase(77, 7168, column_major=True)),
    dequant=(("kv_a", 576, 7168), ("q_a+kv_a", 2112, 7168), ("expert down", 7168, 2048)),
    gemm=_gemm_grid(V3_CHECK_SHAPES, (1, 77, 4096), ("q_a+kv_a", "expert down")) + (
        GemmCase("q_a+kv_a", 2112, 7168, 1, split_k=4), GemmCase("q_a+kv_a", 2112, 7168, 77, split_k=3),
        GemmCase("expert down", 7168, 2048, 1, split_k=3), GemmCase("kv_a", 576, 7168, 77, True, split_k=4),
        GemmCase("q_a+kv_a", 2112, 7168, 77, column_major=True)),
    moe=MoeShape(experts=256, topk=8, hidden=7168, inter=2048),
    moe_check_tokens=(1, 77, 4096),
    mla=MlaShape(heads=128, rank=512, rope=64),
    mla_checks=(MlaCase(4096, (4096, 1, 77, 3000)), MlaCase(32768, (32768,)), MlaCase(300, (300, 129), torch.float32)),
    index=IndexShape(heads=64, dim=128),
    index_checks=(IndexCase(1, 4096, batch=2), IndexCase(64, 4000)),  # 4000 = 31 key tiles + 32
    # K = 2048 of S = 8192 (16 splits of 128 by default); 1100 leading -1: 8 empty splits, one partial;
    # the fp32 case's row 0 keeps a single valid index
    sparse_checks=(SparseCase(128, 2, 8192, 2048, pad=1100), SparseCase(16, 4, 8192, 2048, pad=5),
                   SparseCase(16, 2, 3000, 2048, pad=2047, dtype=torch.float32)),
    gemm_perf=roofline.V3_GEMM_SHAPES,
    gemm_perf_m=roofline.V3_M_VALUES,
    act_quant_perf=((1, 7168), (64, 7168), (4096, 7168)),
    dequant_perf=((2112, 7168), (7168, 18432)),
    moe_perf_tokens=(1, 16, 64, 128, 4096),
    mla_perf=((1, 4096), (8, 4096), (64, 4096), (1, 32768)),
    index_perf=(IndexCase(1, 4096), IndexCase(1, 4096, batch=64), IndexCase(64, 4096), IndexCase(4096, 4096)),
    sparse_perf=(SparseCase(128, 1, 8192, 2048), SparseCase(128, 64, 8192, 2048), SparseCase(16, 64, 8192, 2048)),
    tune_shapes=roofline.V3_GEMM_SHAPES,
    tune_space=GPU_TUNE_SPACE,
)
SMOKE_CHECK_SHAPES = (("ragged N", 192, 256), ("square", 128, 128), ("ragged K", 160, 320))
SMOKE_PLAN = Plan(
    act_quant=(AqCase(1, 256), AqCase(3, 320), AqCase(3, 256, scale_fmt="ue8m0"), AqCase(3, 256, torch.float32),
               AqCase(3, 256, column_major=True)),
    dequant=(("ragged", 192, 320),),
    gemm=_gemm_grid(SMOKE_CHECK_SHAPES, (1, 3), ("ragged N",)) + (
        GemmCase("ragged N", 192, 256, 1, split_k=2), GemmCase("ragged K", 160, 320, 3, True, split_k=2),
        GemmCase("ragged N", 192, 256, 3, column_major=True)),
    moe=MoeShape(experts=4, topk=2, hidden=256, inter=128),
    moe_check_tokens=(1, 5),
    mla=MlaShape(heads=4, rank=64, rope=16),
    mla_checks=(MlaCase(70, (70, 23), torch.float32), MlaCase(40, (40,))),
    index=IndexShape(heads=3, dim=24),  # H, D not powers of two: masked heads and channels
    index_checks=(IndexCase(1, 77, batch=2), IndexCase(3, 130)),  # a partial tile; a full tile + 2
    # K = 37 of S = 100 (two 16-slot tiles + 5), 20 leading -1 in row 0: the default single split starts
    # with a tile of only -1; 3 splits of 16: split 0 has no key, split 1 starts with 4 -1, split 2 has 5 slots
    sparse_checks=(SparseCase(5, 2, 100, 37, pad=20, dtype=torch.float32), SparseCase(5, 2, 100, 37, pad=20, splits=3)),
    gemm_perf=(("ragged N", 192, 256),),
    gemm_perf_m=(1, 3),
    act_quant_perf=((3, 256),),
    dequant_perf=((192, 320),),
    moe_perf_tokens=(3,),
    mla_perf=((1, 70),),
    index_perf=(IndexCase(2, 77),),
    sparse_perf=(SparseCase(5, 1, 100, 37),),
    tune_shapes=(("ragged N", 192, 256),),
    tune_space=(("m16", 3, (("BLOCK_M", (16,)), ("BLOCK_N", (32, 64)), ("GROUP_M", (1,)), ("SPLIT_K", (1, 2)),
                            ("num_warps", (4,)), ("num_stages", (4,)))),),
)


def device_peak(name: str) -> roofline.Device | None:
    """Paper peaks for a CUDA device name, or None ('unknown peak': raw figures only)."""
    upper = name.upper()
    if any(marker in upper for marker in NOT_LISTED):
        return None
    return next((dev for key, dev in DEVICE_PEAKS if key in upper), None)


def slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@dataclass(frozen=True)
class Timer:
    """GPU: do_bench medians in µs; smoke: CPU wall-clock seconds, labelled so (never a GPU figure)."""

    cuda: bool

    def __call__(self, fn: Callable[[], object]) -> float:
        """Seconds one call of `fn` takes."""
        return time_gpu(fn) if self.cuda else time_cpu(fn, SMOKE_TRIALS)

    def fields(self, label: str, seconds: float) -> dict:
        """{label_us: µs} on a GPU, {label_cpu_s: seconds} in the smoke run."""
        return {f"{label}_us": seconds * 1e6} if self.cuda else {f"{label}_cpu_s": seconds}

    def describe(self) -> str:
        """The timer, as the report states it."""
        if self.cuda:
            return "triton.testing.do_bench median (CUDA events, L2 flushed, warm-up 25 ms, 100 ms of repetitions)"
        return (f"time.perf_counter on CPU, minimum of {SMOKE_TRIALS} run(s): Triton kernels in the interpreter, "
                "torch peers on CPU; not GPU figures")


@dataclass
class Budget:
    """The run's deadline; what it cut is listed in `skipped`."""

    deadline: float
    skipped: list[str] = field(default_factory=list)

    def out(self, what: str, deadline: float | None = None) -> bool:
        """True (and `what` recorded as skipped) once the deadline has passed."""
        if time.monotonic() < (self.deadline if deadline is None else min(self.deadline, deadline)):
            return False
        self.skipped.append(what)
        return True


@dataclass
class Run:
    """One check run: mode, device, clock and the report being built."""

    plan: Plan
    device: torch.device
    timer: Timer
    peak: roofline.Device | None
    budget: Budget
    tiles_in: Path
    tiles_out: Path | None
    out_dir: Path
    seed: int
    report: dict
    t0: float = field(default_factory=time.monotonic)
    moe_weights: tuple | None = None

    def gen(self, offset: int) -> torch.Generator:
        """A generator on the run's device, seeded per section."""
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def progress(self, msg: str) -> None:
        """One progress line on stdout."""
        print(f"[gpu_check {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


def _note(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:NOTE_CHARS]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (so NaNs and signed zeros compare exactly)."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    return int((_bits(got) != _bits(want)).sum())


def _randn(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=gen.device).to(dtype)


def _activations(m: int, k: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[m, k] normal values with per-row magnitudes over 2^-6..2^6; the last row's first block zero."""
    row_scale = torch.exp2(torch.rand((m, 1), generator=gen, device=gen.device) * 12 - 6)  # (m, 1)
    x = _randn((m, k), gen) * row_scale
    if m > 1:
        x[-1, :BLOCK] = 0  # an all-zero group: the amax floor
    return x.to(dtype)


def _random_fp8(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random finite e4m3 values |v| < 2 of both signs, drawn on the generator's device."""
    r = torch.randint(0, 0x80, shape, generator=gen, device=gen.device, dtype=torch.uint8)
    return ((r & 0x3F) | ((r & 0x40) << 1)).view(reference.FP8_DTYPE)  # 6 magnitude bits, sign from bit 6


def _row(op: str, case: str, metric: str, value: float | int | None, bound: float | str, ok: bool,
         **extra: object) -> dict:
    return {"op": op, "case": case, "metric": metric, "value": value, "bound": bound, "ok": bool(ok), **extra}


def _close(op: str, case: str, got: torch.Tensor, want: torch.Tensor, bound: float, **extra: object) -> dict:
    err = rel_err(got.float(), want.float())
    return _row(op, case, "max|Δ|/max|twin|", err, bound, err <= bound, **extra)


def _guarded(run: Run, op: str, case: str, check: Callable[[], dict]) -> dict | None:
    """Run one check; a kernel that fails to build or launch is a failed row, not a crash."""
    if run.budget.out(f"correctness {op} {case}"):
        return None
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 (any failure of the kernel under test is reported)
        return _row(op, case, "error", None, "-", False, error=_note(exc))


def _tile_str(cfg: tiles.TileConfig) -> str:
    return (f"{cfg.BLOCK_M}x{cfg.BLOCK_N} g{cfg.GROUP_M} split{cfg.SPLIT_K} "
            f"w{cfg.num_warps} s{cfg.num_stages}")


def _splits(k: int, split_k: int) -> int:
    """How many K splits fp8_gemm launches for `split_k` (it never makes an empty split)."""
    kb = -(-k // BLOCK)
    per = -(-kb // min(split_k, kb))
    return -(-kb // per)


# --- section 1: correctness --------------------------------------------------------------------

def _moe_weights(run: Run) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w13, w13_s, w2, w2_s) of the plan's experts, drawn once on the device and kept for the run."""
    if run.moe_weights is None:
        e, _, hid, inter = run.plan.moe
        gen = run.gen(3)
        w13 = _random_fp8((e, 2 * inter, hid), gen)  # (E, 2I, H)
        w2 = _random_fp8((e, hid, inter), gen)  # (E, H, I)
        w13_s = torch.rand((e, -(-2 * inter // BLOCK), -(-hid // BLOCK)), generator=gen, device=gen.device) * 1e-2
        w2_s = torch.rand((e, -(-hid // BLOCK), -(-inter // BLOCK)), generator=gen, device=gen.device) * 1e-2
        run.moe_weights = (w13, w13_s, w2, w2_s)
    return run.moe_weights


def _moe_tokens(shape: MoeShape, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(x bf16 [T, H], routing weights [T, topk], distinct expert ids [T, topk])."""
    scores = torch.rand((tokens, shape.experts), generator=gen, device=gen.device)  # (T, E)
    ids = scores.topk(shape.topk, dim=1).indices  # (T, topk)
    weights = torch.rand((tokens, shape.topk), generator=gen, device=gen.device)
    return _randn((tokens, shape.hidden), gen, torch.bfloat16), weights, ids


def _mla_inputs(shape: MlaShape, batch: int, seq: int, dtype: torch.dtype,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [B, H, C+R], cache [B, S, C+R]) in `dtype`; the kernels take [..., :C] / [..., C:] views."""
    width = shape.rank + shape.rope
    return _randn((batch, shape.heads, width), gen, dtype), _randn((batch, seq, width), gen, dtype)


def _mla_args(shape: MlaShape, q: torch.Tensor, cache: torch.Tensor, lens: torch.Tensor) -> tuple:
    c = shape.rank
    return q[..., :c], q[..., c:], cache[..., :c], cache[..., c:], lens, (c + shape.rope) ** -0.5


def _index_inputs(shape: IndexShape, c: IndexCase, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(q, q_scale, k, k_scale, weights) as the indexer feeds them, drawn on the generator's device.

    q fp8 [B, T, H, D] and k fp8 [B, S, D] from act_quant with one fp32 scale per D-row (q_scale
    [B, T, H], k_scale [B, S]); row magnitudes over 2^-3..2^3; the last token's first head and the
    last key are all zero (the act_quant floor scale, logits exactly 0); weights [B, T, H] fp32 of
    both signs, as learned head weights are.
    """
    h, d = shape

    def rows(*lead: int) -> torch.Tensor:  # (*lead, D), per-row magnitude 2^-3..2^3
        mag = torch.exp2(torch.rand((*lead, 1), generator=gen, device=gen.device) * 6 - 3)
        return _randn((*lead, d), gen) * mag

    q = rows(c.batch, c.tokens, h)  # (B, T, H, D)
    k = rows(c.batch, c.keys)  # (B, S, D)
    q[-1, -1, 0] = 0
    k[-1, -1] = 0
    weights = _randn((c.batch, c.tokens, h), gen)  # (B, T, H)
    q8, q_scale = reference.act_quant(q, d)  # (B, T, H, D), (B, T, H, 1)
    k8, k_scale = reference.act_quant(k, d)  # (B, S, D), (B, S, 1)
    return q8, q_scale.squeeze(-1), k8, k_scale.squeeze(-1), weights


def _index_name(shape: IndexShape, c: IndexCase) -> str:
    return f"B{c.batch} T{c.tokens} S{c.keys} H{shape.heads} D{shape.dim} fp8"


def _sparse_args(mla: MlaShape, c: SparseCase, gen: torch.Generator) -> tuple:
    """(q_lat, q_rope, kv, k_rope, indices [B, K] int64, scale) of one sparse_mla_decode case.

    Each sequence selects `topk` distinct cache rows, ascending; row 0 starts with `pad` -1 entries.
    """
    q, cache = _mla_inputs(MlaShape(c.heads, mla.rank, mla.rope), c.batch, c.seq, c.dtype, gen)
    scores = torch.rand((c.batch, c.seq), generator=gen, device=gen.device)  # (B, S)
    idx = scores.topk(c.topk, dim=1).indices.sort(dim=1).values  # (B, K) distinct, ascending
    idx[0, :c.pad] = -1
    r = mla.rank
    return q[..., :r], q[..., r:], cache[..., :r], cache[..., r:], idx, (r + mla.rope) ** -0.5


def _sparse_name(mla: MlaShape, c: SparseCase) -> str:
    return (f"B{c.batch} H{c.heads} C{mla.rank}+R{mla.rope} top{c.topk} of S{c.seq}"
            + (f" row0 {c.pad}x -1" if c.pad else "") + (f" splits={c.splits}" if c.splits else "")
            + f" {_dtype_name(c.dtype)}")


def _act_quant_case(kernels: ModuleType, gen: torch.Generator, c: AqCase) -> dict:
    x = _activations(c.m, c.k, gen, c.dtype)
    y, s = kernels.act_quant(x, BLOCK, c.scale_fmt, column_major_scales=c.column_major)
    y_ref, s_ref = reference.act_quant(x, BLOCK, c.scale_fmt, column_major_scales=c.column_major)
    bad = _mismatches(y, y_ref) + _mismatches(s, s_ref)
    return _row("act_quant", _aq_name(c), "mismatched elements (fp8 codes + scales)", bad, EXACT,
                bad == 0 and s.stride() == s_ref.stride(), scale_strides=list(s.stride()))


def _aq_name(c: AqCase) -> str:
    return (f"x {_dtype_name(c.dtype)} [{c.m}, {c.k}] scale_fmt={c.scale_fmt}"
            + (" column-major scales" if c.column_major else ""))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


def _dequant_name(name: str, n: int, k: int, dtype: torch.dtype) -> str:
    return f"{name} [{n}, {k}] -> {_dtype_name(dtype)}"


def _dequant_case(kernels: ModuleType, gen: torch.Generator, name: str, n: int, k: int,
                  dtype: torch.dtype) -> dict:
    q, s = reference.weight_quant(_randn((n, k), gen) * 0.02)
    bad = _mismatches(kernels.weight_dequant(q, s, BLOCK, dtype), reference.weight_dequant(q, s, BLOCK, dtype))
    return _row("weight_dequant", _dequant_name(name, n, k, dtype), "mismatched elements", bad, EXACT, bad == 0)


def _gemm_op(c: GemmCase) -> str:
    return "fp8_gemm split-K" if c.split_k else "fp8_gemm"


def _gemm_name(c: GemmCase) -> str:
    return (f"{c.name} M={c.m} N={c.n} K={c.k} -> {'bf16' if c.bf16_out else 'fp32'}"
            + (f" split_k={c.split_k}" if c.split_k else "") + (" column-major a_s" if c.column_major else ""))


def _gemm_case(kernels: ModuleType, gen: torch.Generator, tiles_in: Path, c: GemmCase) -> dict:
    a, a_s = reference.act_quant(_activations(c.m, c.k, gen), column_major_scales=c.column_major)
    q, w_s = reference.weight_quant(_randn((c.n, c.k), gen) * 0.05)
    cfg = tiles.get_tile(c.n, c.k, c.m, tiles_in)
    cfg = dataclasses.replace(cfg, SPLIT_K=c.split_k) if c.split_k else cfg
    got = kernels.fp8_gemm(a, a_s, q, w_s, torch.bfloat16 if c.bf16_out else torch.float32, BLOCK, config=cfg)
    want = reference.fp8_gemm(a, a_s, q, w_s, torch.float32, BLOCK)
    bound = GEMM_ACC_BOUND + (BF16_OUT_BOUND if c.bf16_out else 0.0)
    return _close(_gemm_op(c), _gemm_name(c), got, want, bound, tile=_tile_str(cfg),
                  splits=_splits(c.k, cfg.SPLIT_K))


def _moe_name(shape: MoeShape, tokens: int) -> str:
    return f"T={tokens} E{shape.experts} top{shape.topk} H{shape.hidden} I{shape.inter} bf16"


def _moe_case(kernels: ModuleType, gen: torch.Generator, run: Run, tokens: int) -> dict:
    weights = _moe_weights(run)
    x, tw, ids = _moe_tokens(run.plan.moe, tokens, gen)
    got = kernels.fused_moe(x, tw, ids, *weights, BLOCK)
    want = reference.fused_moe(x, tw, ids, *weights, BLOCK)
    return _close("fused_moe", _moe_name(run.plan.moe, tokens), got, want, MOE_BOUND)


def _mla_name(shape: MlaShape, batch: int, seq: int, dtype: torch.dtype, lens: tuple[int, ...] = ()) -> str:
    return (f"B{batch} H{shape.heads} C{shape.rank}+R{shape.rope} S{seq}"
            + (f" lens={list(lens)}" if lens else "") + f" {_dtype_name(dtype)}")


def _mla_case(kernels: ModuleType, gen: torch.Generator, shape: MlaShape, device: torch.device,
              c: MlaCase) -> dict:
    q, cache = _mla_inputs(shape, len(c.lens), c.seq, c.dtype, gen)
    args = _mla_args(shape, q, cache, torch.tensor(c.lens, dtype=torch.int32, device=device))
    return _close("mla_decode", _mla_name(shape, len(c.lens), c.seq, c.dtype, c.lens),
                  kernels.mla_decode(*args), reference.mla_decode(*args), MLA_BOUND)


def _index_case(kernels: ModuleType, gen: torch.Generator, shape: IndexShape, c: IndexCase) -> dict:
    args = _index_inputs(shape, c, gen)
    return _close("index_logits", _index_name(shape, c), kernels.index_logits(*args),
                  reference.index_logits(*args), INDEX_ACC_BOUND)


def _sparse_case(kernels: ModuleType, gen: torch.Generator, mla: MlaShape, c: SparseCase) -> dict:
    args = _sparse_args(mla, c, gen)
    return _close("sparse_mla_decode", _sparse_name(mla, c), kernels.sparse_mla_decode(*args, num_splits=c.splits),
                  reference.sparse_mla_decode(*args), MLA_BOUND)


def _check_quant(run: Run, kernels: ModuleType) -> list[dict | None]:
    gen = run.gen(1)
    rows = [_guarded(run, "act_quant", _aq_name(c), functools.partial(_act_quant_case, kernels, gen, c))
            for c in run.plan.act_quant]
    return rows + [_guarded(run, "weight_dequant", _dequant_name(name, n, k, dtype),
                            functools.partial(_dequant_case, kernels, gen, name, n, k, dtype))
                   for name, n, k in run.plan.dequant for dtype in (torch.float32, torch.bfloat16)]


def _check_gemm(run: Run, kernels: ModuleType) -> list[dict | None]:
    gen = run.gen(2)
    return [_guarded(run, _gemm_op(c), _gemm_name(c), functools.partial(_gemm_case, kernels, gen, run.tiles_in, c))
            for c in run.plan.gemm]


def _check_moe_mla(run: Run, kernels: ModuleType) -> list[dict | None]:
    gen = run.gen(4)
    rows = [_guarded(run, "fused_moe", _moe_name(run.plan.moe, t), functools.partial(_moe_case, kernels, gen, run, t))
            for t in run.plan.moe_check_tokens]
    shape = run.plan.mla
    return rows + [_guarded(run, "mla_decode", _mla_name(shape, len(c.lens), c.seq, c.dtype, c.lens),
                            functools.partial(_mla_case, kernels, gen, shape, run.device, c))
                   for c in run.plan.mla_checks]


def _check_dsa(run: Run, kernels: ModuleType) -> list[dict | None]:
    gen = run.gen(8)
    index, mla = run.plan.index, run.plan.mla
    rows = [_guarded(run, "index_logits", _index_name(index, c), functools.partial(_index_case, kernels, gen, index, c))
            for c in run.plan.index_checks]
    return rows + [_guarded(run, "sparse_mla_decode", _sparse_name(mla, c),
                            functools.partial(_sparse_case, kernels, gen, mla, c))
                   for c in run.plan.sparse_checks]


# --- section 2: tile search --------------------------------------------------------------------

def _candidates(fields: tuple[tuple[str, tuple[int, ...]], ...]) -> list[tiles.TileConfig]:
    """Every legal config of a bucket's search space (the product of the field values)."""
    names = [name for name, _ in fields]
    out = []
    for values in itertools.product(*(vals for _, vals in fields)):
        cfg = tiles.TileConfig(**dict(zip(names, values)))
        try:
            tiles.check_tile(cfg, BLOCK)
        except ValueError:
            continue
        out.append(cfg)
    return out


def _tune(run: Run, kernels: ModuleType, seconds: float) -> dict:
    """Time each bucket's candidates against the table's config; write the verified winners."""
    deadline = time.monotonic() + seconds
    table = json.loads(run.tiles_in.read_text(encoding="utf-8"))  # a private copy, not the cached table
    gen = run.gen(5)
    weights = {(n, k): reference.weight_quant(_randn((n, k), gen) * 0.05) for _, n, k in run.plan.tune_shapes}
    rows, written = [], []
    for bucket, m, fields in run.plan.tune_space:  # bucket-major: a cut run still covers every shape
        space = _candidates(fields)
        for name, n, k in run.plan.tune_shapes:
            if run.budget.out(f"tune {n}x{k} {bucket}", deadline):
                continue
            q, w_s = weights[(n, k)]
            a, a_s = reference.act_quant(_activations(m, k, gen))
            current = tiles.get_tile(n, k, m, run.tiles_in)
            todo = [current] + [c for c in space if c != current]
            times, tried = {}, 0
            for cfg in todo:
                if time.monotonic() > deadline:
                    break
                tried += 1
                try:
                    times[cfg] = run.timer(functools.partial(kernels.fp8_gemm, a, a_s, q, w_s, torch.bfloat16,
                                                             BLOCK, config=cfg))
                except Exception:  # noqa: BLE001 (a candidate that does not build or fit is skipped)
                    continue
            row = {"shape": name, "N": n, "K": k, "bucket": bucket, "M": m, "candidates": len(todo),
                   "failed": tried - len(times), "current": _tile_str(current)}
            if tried < len(todo) or current not in times:
                row["result"] = "incomplete: time budget" if tried < len(todo) else "table config failed"
                run.budget.skipped.append(f"tune {n}x{k} {bucket} (partial search)")
                rows.append(row)
                continue
            best = min(times, key=times.get)
            row.update(run.timer.fields("current", times[current]), best=_tile_str(best),
                       **run.timer.fields("best", times[best]))
            row["result"] = "kept"
            if best != current and times[best] <= (1.0 - TUNE_MIN_GAIN) * times[current]:
                want = reference.fp8_gemm(a, a_s, q, w_s, torch.float32, BLOCK)
                err = rel_err(kernels.fp8_gemm(a, a_s, q, w_s, torch.float32, BLOCK, config=best).float(), want)
                row["best_rel_err"] = err
                if err <= GEMM_ACC_BOUND:
                    table["shapes"].setdefault(f"{n}x{k}", {})[bucket] = dataclasses.asdict(best)
                    written.append(f"{n}x{k}/{bucket}")
                    row["result"] = "written"
                else:
                    row["result"] = "rejected: fails the twin check"
            rows.append(row)
    if written:
        table["_tuned"] = {"device": run.report["device"]["name"], "note": TUNED_NOTE,
                           "date": datetime.date.today().isoformat(), "triton": run.report["versions"]["triton"],
                           "entries": sorted(set(table.get("_tuned", {}).get("entries", [])) | set(written))}
    tiles.write_tiles(table, run.tiles_out, BLOCK)
    return {"file": str(run.tiles_out), "min_gain": TUNE_MIN_GAIN, "written": written, "rows": rows}


# --- sections 3 and 4: timings -----------------------------------------------------------------

def _figures(run: Run, label: str, seconds: float, nbytes: float, flops: float = 0.0,
             peak: str | None = None) -> dict:
    """Raw time, then (GPU only) GB/s, TFLOP/s and, on a listed device, % of HBM, peak and floor.

    Args:
        run: the run (its timer labels the time; its peak decides the % figures).
        label: field prefix.
        seconds: the measured time.
        nbytes: compulsory HBM bytes; flops: floating-point operations (0: not reported).
        peak: "fp8" or "bf16": the tensor-core peak for % of peak and of the roofline floor.
    """
    out = run.timer.fields(label, seconds)
    if not run.timer.cuda:
        return out
    out[f"{label}_gbps"] = nbytes / seconds / 1e9
    if flops:
        out[f"{label}_tflops"] = flops / seconds / 1e12
    dev = run.peak
    if dev is None:
        return out
    out[f"{label}_pct_hbm"] = 100.0 * nbytes / (dev.hbm_tbps * 1e12) / seconds
    if flops and peak:
        peak_tflops = getattr(dev, f"{peak}_tflops")
        out[f"{label}_pct_peak"] = 100.0 * flops / (peak_tflops * 1e12) / seconds
        out[f"{label}_pct_floor"] = 100.0 * roofline.floor_seconds(flops, nbytes, peak_tflops, dev.hbm_tbps) / seconds
    return out


def _timed(run: Run, row: dict, label: str, fn: Callable[[], object], nbytes: float, flops: float = 0.0,
           peak: str | None = None) -> float | None:
    """Time `fn` into `row`; a failure is noted in the row (never a crash). Returns the seconds."""
    try:
        seconds = run.timer(fn)
    except Exception as exc:  # noqa: BLE001
        row[label] = f"error: {_note(exc)}"
        return None
    row.update(_figures(run, label, seconds, nbytes, flops, peak))
    return seconds


def _speedup(run: Run, row: dict, key: str, peer_s: float | None, triton_s: float | None) -> None:
    """row[key] = peer time / Triton time, for GPU timings only (CPU smoke timings derive nothing)."""
    if run.timer.cuda and peer_s and triton_s:
        row[key] = peer_s / triton_s


def _blockwise_scaled_mm(a: torch.Tensor, a_s_cm: torch.Tensor, q: torch.Tensor,
                         w_s: torch.Tensor) -> tuple[Callable[[], torch.Tensor] | None, str]:
    """torch's blockwise fp8 GEMM (1×128 activation, 128×128 weight scales) if this torch runs it.

    Tries torch._scaled_mm (block scales recognised by shape) then F.scaled_mm with explicit
    recipes. Returns (a call, the API name) or (None, "unsupported: <reason>").
    """
    import torch.nn.functional as F  # noqa: PLC0415

    kb = w_s.shape[1]
    kb_pad = -(-kb // reference.SCALE_ROW_ALIGN) * reference.SCALE_ROW_ALIGN
    w_s_t = torch.zeros((w_s.shape[0], kb_pad), dtype=torch.float32, device=w_s.device)[:, :kb]
    w_s_t = w_s_t.copy_(w_s).t()  # (KB, NB) column-major, leading dimension padded to 4
    calls = [("torch._scaled_mm", lambda: torch._scaled_mm(a, q.t(), scale_a=a_s_cm, scale_b=w_s_t,
                                                            out_dtype=torch.bfloat16))]
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        recipe = F.ScalingType
        calls.append(("F.scaled_mm", lambda: F.scaled_mm(a, q.t(), a_s_cm, recipe.BlockWise1x128, w_s_t,
                                                         recipe.BlockWise128x128, output_dtype=torch.bfloat16)))
    reason = "no blockwise API"
    for name, call in calls:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 (unsupported in this torch / on this device)
            reason = _note(exc)
            continue
        return call, name
    return None, f"unsupported: {reason}"


def _gemm_perf(run: Run, kernels: ModuleType) -> list[dict]:
    gen = run.gen(6)
    rows = []
    for name, n, k in run.plan.gemm_perf:
        w = _randn((n, k), gen) * 0.05
        q, w_s = reference.weight_quant(w)
        wb = w.to(torch.bfloat16)
        del w
        for m in run.plan.gemm_perf_m:
            if run.budget.out(f"fp8_gemm timing {name} M={m}"):
                continue
            x = _activations(m, k, gen)
            a, a_s = reference.act_quant(x)
            a_s_cm = reference.act_quant(x, column_major_scales=True)[1]
            xb = x.to(torch.bfloat16)
            cfg = tiles.get_tile(n, k, m, run.tiles_in)
            flops = roofline.gemm_flops(m, n, k)
            fp8_bytes = roofline.fp8_gemm_bytes(m, n, k)
            row = {"shape": name, "M": m, "N": n, "K": k, "tile": _tile_str(cfg)}
            if run.peak is not None:
                floor = roofline.fp8_gemm_floor(m, n, k, run.peak)
                row.update(floor_us=floor * 1e6, bound="memory" if roofline.is_memory_bound(m, n, k, run.peak)
                           else "compute")
            t_tr = _timed(run, row, "triton", lambda: kernels.fp8_gemm(a, a_s, q, w_s, torch.bfloat16, BLOCK,
                                                                       config=cfg), fp8_bytes, flops, "fp8")
            call, api = _blockwise_scaled_mm(a, a_s_cm, q, w_s)
            row["scaled_mm"] = api
            if call is not None:
                ref = kernels.fp8_gemm(a, a_s, q, w_s, torch.bfloat16, BLOCK, config=cfg)
                row["scaled_mm_vs_triton_rel_err"] = rel_err(call().float(), ref.float())
                t_sm = _timed(run, row, "scaled_mm", call, fp8_bytes, flops, "fp8")
                _speedup(run, row, "triton_speedup_vs_scaled_mm", t_sm, t_tr)
            t_bf = _timed(run, row, "bf16_matmul", lambda: torch.matmul(xb, wb.t()),
                          roofline.bf16_gemm_bytes(m, n, k), flops, "bf16")
            _speedup(run, row, "triton_speedup_vs_bf16", t_bf, t_tr)
            rows.append(row)
        run.progress(f"fp8_gemm timings: {name} N={n} K={k} done")
    return rows


def _dequant_bytes(n: int, k: int, out_bytes: int) -> float:
    """Read fp8 weight and fp32 block scales, write the dequantized weight."""
    return n * k * (roofline.FP8_BYTES + out_bytes) + roofline.FP32_BYTES * -(-n // BLOCK) * -(-k // BLOCK)


def _bandwidth_perf(run: Run, kernels: ModuleType) -> list[dict]:
    """Timings of the memory-bound kernels (and the fused MoE), one row per planned case."""
    gen = run.gen(7)
    rows: list[dict] = []

    def case(op: str, name: str, make: Callable[[], tuple]) -> None:
        # make() builds the inputs and returns (call, bytes moved[, flops, peak]); skipped once the budget is out
        if run.budget.out(f"{op} timing {name}"):
            return
        fn, *figures = make()
        row = {"op": op, "case": name}
        _timed(run, row, "triton", fn, *figures)
        rows.append(row)

    def act_quant(m: int, k: int) -> tuple:
        x = _activations(m, k, gen, torch.bfloat16)
        return lambda: kernels.act_quant(x, BLOCK, None), roofline.act_quant_bytes(m, k)

    def dequant(n: int, k: int) -> tuple:
        q, s = reference.weight_quant(_randn((n, k), gen) * 0.02)
        return lambda: kernels.weight_dequant(q, s, BLOCK, torch.bfloat16), _dequant_bytes(n, k, roofline.BF16_BYTES)

    shape, mla, index = run.plan.moe, run.plan.mla, run.plan.index

    def moe(tokens: int) -> tuple:
        weights = _moe_weights(run)
        x, tw, ids = _moe_tokens(shape, tokens, gen)
        return (lambda: kernels.fused_moe(x, tw, ids, *weights, BLOCK),
                roofline.moe_bytes(tokens, shape.topk, shape.experts, shape.hidden, shape.inter),
                roofline.moe_flops(tokens, shape.topk, shape.hidden, shape.inter), "fp8")

    def mla_decode(batch: int, seq: int) -> tuple:
        q, cache = _mla_inputs(mla, batch, seq, torch.bfloat16, gen)
        args = _mla_args(mla, q, cache, torch.full((batch,), seq, dtype=torch.int32, device=run.device))
        return (lambda: kernels.mla_decode(*args),
                roofline.mla_decode_bytes(batch, seq, mla.heads, mla.rank + mla.rope, mla.rank))

    def index_logits(c) -> tuple:
        args = _index_inputs(index, c, gen)
        return (lambda: kernels.index_logits(*args),
                roofline.index_logits_bytes(c.batch, c.tokens, c.keys, index.heads, index.dim),
                roofline.index_logits_flops(c.batch, c.tokens, c.keys, index.heads, index.dim), "fp8")

    def sparse_decode(c) -> tuple:
        args = _sparse_args(mla, c, gen)
        return (lambda: kernels.sparse_mla_decode(*args, num_splits=c.splits),
                roofline.sparse_mla_decode_bytes(c.batch, c.topk, c.heads, mla.rank + mla.rope, mla.rank,
                                                 cache_bytes=c.dtype.itemsize, index_bytes=args[4].element_size(),
                                                 q_bytes=c.dtype.itemsize))

    for m, k in run.plan.act_quant_perf:
        case("act_quant", f"bf16 [{m}, {k}]", lambda m=m, k=k: act_quant(m, k))
    for n, k in run.plan.dequant_perf:
        case("weight_dequant", f"[{n}, {k}] -> bf16", lambda n=n, k=k: dequant(n, k))
    for tokens in run.plan.moe_perf_tokens:
        case("fused_moe", _moe_name(shape, tokens), lambda t=tokens: moe(t))
    for batch, seq in run.plan.mla_perf:
        case("mla_decode", _mla_name(mla, batch, seq, torch.bfloat16), lambda b=batch, s=seq: mla_decode(b, s))
    for c in run.plan.index_perf:
        case("index_logits", _index_name(index, c), lambda c=c: index_logits(c))
    for c in run.plan.sparse_perf:
        case("sparse_mla_decode", _sparse_name(mla, c), lambda c=c: sparse_decode(c))
    return rows


# --- report ------------------------------------------------------------------------------------

def _columns(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(key for row in rows for key in row))


def _markdown(report: dict) -> str:
    dev = report["device"]
    parts = [f"# GPU check: {dev['name']}", "", f"**{report['statement']}**", "",
             " · ".join(f"{k}: {v}" for k, v in dev.items()), "",
             " · ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             f"peak: {report['peak']}", "", f"timer: {report['timer']}", "",
             "Triton kernels checked: " + ", ".join(f"{k} ({v})" for k, v in report["kernels"].items()), "",
             f"result: {'all checks pass' if report['all_pass'] else 'A CHECK FAILED'}"
             f"{'' if report['complete'] else ' (incomplete: time budget, see Skipped)'}", "",
             "## Correctness (Triton kernel vs its torch twin, same device)", "",
             "Bounds: " + "; ".join(f"{k}: {v}" for k, v in report["bounds"].items()), ""]
    if report["correctness"]:
        parts += [table(report["correctness"], _columns(report["correctness"])), ""]
    for title, key in (("fp8_gemm timings", "gemm"), ("Memory-bound kernels", "bandwidth")):
        if report[key]:
            parts += [f"## {title}", "", table(report[key], _columns(report[key])), ""]
    if report["tune"]:
        tune = report["tune"]
        parts += ["## Tile search (--tune)", "", f"table written: {tune['file']}; entries changed: "
                  f"{', '.join(tune['written']) or 'none'}", ""]
        if tune["rows"]:
            parts += [table(tune["rows"], _columns(tune["rows"])), ""]
    if report["skipped"]:
        parts += ["## Skipped (time budget)", ""] + [f"- {s}" for s in report["skipped"]] + [""]
    parts += [report["legend"], ""]
    return "\n".join(parts)


def _write(run: Run) -> tuple[Path, Path]:
    """(Re)write OUT/<slug>.json and .md from the report so far."""
    report = run.report
    report["skipped"] = list(run.budget.skipped)
    report["complete"] = not run.budget.skipped
    report["all_pass"] = all(r["ok"] for r in report["correctness"])
    report["seconds"] = time.monotonic() - run.t0
    run.out_dir.mkdir(parents=True, exist_ok=True)
    stem = run.out_dir / slug(report["device"]["name"])
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(_markdown(report), encoding="utf-8")
    return json_path, md_path


def _driver_version() -> str:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True)
        return proc.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def _device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"name": SMOKE_DEVICE_NAME, "processor": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": _driver_version(), "cuda": torch.version.cuda}


LEGEND = ("Figures: *_us = time per call; *_tflops = 2·M·N·K / time (fused_moe, index_logits: 2 × their "
          "multiply-adds / time); *_pct_peak = % of the device's paper tensor-core peak (fp8 or bf16, "
          "dense); *_pct_floor = % of the roofline floor, "
          "floor = max(compulsory bytes / HBM bandwidth, flops / peak), 100 % = at the floor; "
          "*_gbps = compulsory HBM bytes / time; *_pct_hbm = % of the paper HBM bandwidth; speedups "
          "are peer time / Triton time in the same run. *_cpu_s = CPU wall-clock seconds of the smoke "
          "run (Triton interpreter): not GPU figures.")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m deepseek_model.benchmarks.gpu_check",
                                description=__doc__.splitlines()[0],
                                epilog="Exit status: 0 pass, 1 a check failed, 2 refused, 3 pass but incomplete.")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"result folder (default {DEFAULT_OUT})")
    p.add_argument("--smoke", action="store_true",
                   help="CPU tensors in the Triton interpreter at tiny shapes: correctness + result files only")
    p.add_argument("--tune", action="store_true", help="search GEMM tile configs and write the winners")
    p.add_argument("--tiles", type=Path, default=tiles.TILES_FILE, help="tile table the GEMMs read")
    p.add_argument("--tiles-out", type=Path, default=None,
                   help="where --tune writes (default: --tiles; with --smoke: OUT/tiles.json)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"time budget of the whole run; later items are skipped (default {DEFAULT_MAX_SECONDS:g})")
    p.add_argument("--tune-seconds", type=float, default=DEFAULT_TUNE_SECONDS,
                   help=f"time budget of --tune inside --max-seconds (default {DEFAULT_TUNE_SECONDS:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of every random operand (default 0)")
    args = p.parse_args(argv)
    if not (args.max_seconds >= 0 and args.tune_seconds >= 0):  # also refuses nan
        p.error("--max-seconds/--tune-seconds: expected a non-negative number")
    if args.tiles_out is None:
        args.tiles_out = Path(args.out) / "tiles.json" if args.smoke else args.tiles
    return args


def _refusal(args: argparse.Namespace) -> str | None:
    """Why this run cannot start (one line), or None."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.smoke:
        if args.tune and args.tiles_out.resolve() == tiles.TILES_FILE.resolve():
            return "--smoke --tune never writes the package tile table: interpreter timings are not GPU figures"
        if not interpret and "deepseek_model.kernels.fp8_quant" in sys.modules:
            return "--smoke needs TRITON_INTERPRET=1 before the kernels are imported"
        return None
    if not torch.cuda.is_available():
        return (f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}); "
                "this check needs an NVIDIA GPU of compute capability >= 8.9 (--smoke runs it on CPU)")
    if interpret:
        return "TRITON_INTERPRET=1 is set: unset it for the GPU run (or use --smoke)"
    cap = torch.cuda.get_device_capability(0)
    if cap < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name(0)} has compute capability {cap[0]}.{cap[1]}; fp8 tl.dot needs >= 8.9"
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as exc:
        return f"triton is not importable: {_note(exc)}"
    return None


def _start(args: argparse.Namespace) -> Run:
    device = torch.device("cpu" if args.smoke else "cuda:0")
    info = _device_info(device)
    peak = None if args.smoke else device_peak(info["name"])
    timer = Timer(cuda=not args.smoke)
    if args.smoke:
        statement = ("SMOKE RUN: Triton kernels in the CPU interpreter at tiny shapes; correctness and result "
                     "files only. Timings are CPU wall-clock, not GPU figures.")
        peak_text = "none (CPU smoke run): no rate or % figure is derived"
    else:
        statement = f"GPU run on {info['name']}: correctness vs the torch twins, then timings ({timer.describe()})"
        peak_text = (f"{peak.name} paper peaks: FP8 {peak.fp8_tflops:g} TFLOP/s dense, bf16 {peak.bf16_tflops:g}, "
                     f"HBM {peak.hbm_tbps:g} TB/s" if peak else "unknown peak: raw figures only")
    report = {
        "mode": "smoke" if args.smoke else "gpu", "statement": statement, "device": info,
        "versions": {**versions(), "cuda": torch.version.cuda},
        "peak": peak_text, "timer": timer.describe(),
        "fp32_matmul_precision": torch.get_float32_matmul_precision(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": {k: str(v) for k, v in vars(args).items()},
        "bounds": {"metric": "max|kernel - twin| / max|twin| (twin: kernels/reference.py, fp32, same device)",
                   "act_quant": EXACT, "weight_dequant": EXACT, "fp8_gemm fp32 out": GEMM_ACC_BOUND,
                   "fp8_gemm bf16 out": GEMM_ACC_BOUND + BF16_OUT_BOUND, "fused_moe": MOE_BOUND,
                   "mla_decode": MLA_BOUND, "index_logits": INDEX_ACC_BOUND, "sparse_mla_decode": MLA_BOUND},
        "kernels": {k: ", ".join(op for name, op in KERNELS if name == k) for k, _ in KERNELS},
        "correctness": [], "gemm": [], "bandwidth": [], "tune": None,
        "legend": LEGEND,
    }
    return Run(plan=SMOKE_PLAN if args.smoke else GPU_PLAN, device=device, timer=timer, peak=peak,
               budget=Budget(time.monotonic() + args.max_seconds), tiles_in=args.tiles,
               tiles_out=args.tiles_out if args.tune else None, out_dir=Path(args.out), seed=args.seed,
               report=report)


def _sections(run: Run, kernels: ModuleType, tune_seconds: float) -> None:
    """Correctness, the optional tile search, then the timings; files rewritten after each."""
    report = run.report
    for name, check in (("act_quant + weight_dequant", _check_quant), ("fp8_gemm", _check_gemm),
                        ("fused_moe + mla_decode", _check_moe_mla),
                        ("index_logits + sparse_mla_decode", _check_dsa)):
        rows = [r for r in check(run, kernels) if r is not None]
        report["correctness"] += rows
        bad = [r["case"] for r in rows if not r["ok"]]
        run.progress(f"correctness {name}: {len(rows) - len(bad)}/{len(rows)} pass"
                     + (f"; FAILED: {'; '.join(bad)}" if bad else ""))
        _write(run)
    if run.tiles_out is not None:
        report["tune"] = _tune(run, kernels, tune_seconds)
        run.tiles_in = run.tiles_out  # the timings below use the searched table
        run.progress(f"tune: {len(report['tune']['written'])} entries written to {run.tiles_out}")
        _write(run)
    for name, section, key in (("fp8_gemm", _gemm_perf, "gemm"), ("memory-bound kernels", _bandwidth_perf,
                                                                  "bandwidth")):
        report[key] = section(run, kernels)
        run.progress(f"timings {name}: {len(report[key])} rows")
        _write(run)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Run the check; return the exit status (see the module docstring)."""
    args = _parse(argv)
    reason = _refusal(args)
    if reason:
        print(f"gpu_check: {reason}", file=sys.stderr)
        return EXIT_REFUSED
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated, i.e. imported
    from deepseek_model.kernels import triton_ops  # noqa: PLC0415 (after the interpreter switch)

    run = _start(args)
    run.progress(f"{run.report['mode']} run on {run.report['device']['name']}; peak: {run.report['peak']}; "
                 f"budget {args.max_seconds:g}s")
    _sections(run, triton_ops, args.tune_seconds)
    json_path, md_path = _write(run)
    report = run.report
    failed = [r for r in report["correctness"] if not r["ok"]]
    run.progress(f"{len(report['correctness']) - len(failed)}/{len(report['correctness'])} correctness checks pass"
                 + (f"; {len(run.budget.skipped)} items skipped (time budget)" if run.budget.skipped else "")
                 + f"; wrote {json_path} and {md_path}")
    if failed:
        return EXIT_FAILED
    return EXIT_OK if report["complete"] else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
