"""Kernel benchmark: block-fp8 GEMM, act_quant, fused MoE and MLA decode → JSON + markdown + PNG.

On CUDA: the Triton kernels timed with triton.testing.do_bench (L2 flushed between repetitions,
warm-up first) at DeepSeek-V3's GEMM shapes and decode/prefill M values, in TFLOP/s, GB/s and % of the
H100 roofline floor, next to torch bf16 F.linear (and torch._scaled_mm with per-row scales where
it runs) measured in the same run.
On CPU (no GPU present): the same table for the pure-torch twins at restricted shapes, with the
ratio against bf16 F.linear measured in the same run; GPU columns are left empty and the report
says "no GPU present". `--interpret` also runs the Triton kernels in the interpreter on small
shapes and checks them against their twins (correctness only: interpreter time means nothing).

Usage: python -m deepseek_model.benchmarks.bench_kernels [--quick] [--interpret] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from deepseek_model import memory, plotting
from deepseek_model.benchmarks import results_io, roofline
from deepseek_model.commands.parser import Parser
from deepseek_model.kernels import reference

NO_GPU = "no GPU present: CPU timings of the pure-torch twins only; no GPU figure was measured"
DEFAULT_OUT = "bench_out/kernels"
CPU_M_VALUES = (1, 16, 64)
QUICK_M_VALUES = (1, 16)
WARMUP = 1
TRIALS = 5
QUICK_TRIALS = 2
MOE_CFG = {"experts": 8, "topk": 2, "hidden": 512, "inter": 256}
MLA_CFG = {"heads": 16, "kv_lora_rank": 512, "rope": 64, "seq": 1024}
QUICK_MOE_CFG = {"experts": 4, "topk": 2, "hidden": 256, "inter": 128}
QUICK_MLA_CFG = {"heads": 4, "kv_lora_rank": 64, "rope": 16, "seq": 96}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="deepseek-model bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory for results.{json,md,png}")
    p.add_argument("--json", default=None, help="also write the JSON report to this file")
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
    p.add_argument("--interpret", action="store_true",
                   help="run the Triton kernels in the CPU interpreter on small shapes vs their twins")
    p.add_argument("--n-div", type=int, default=16, help="CPU: divide every N by this (default 16)")
    p.add_argument("--k-div", type=int, default=1, help="CPU: divide every K by this (default 1)")
    p.add_argument("--m", type=int, nargs="*", default=None,
                   help="M values (default on a GPU: DeepSeek-V3's decode and prefill row counts)")
    p.add_argument("--trials", type=int, default=None,
                   help=f"CPU timing trials (default {TRIALS}, quick {QUICK_TRIALS})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads (1 gives stable figures on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n_div < 1 or args.k_div < 1:
        p.error("--n-div/--k-div: expected a positive integer")
    if args.m is not None and (not args.m or min(args.m) < 1):
        p.error(f"--m: expected positive integers, got {args.m}")
    if args.trials is None:
        args.trials = QUICK_TRIALS if args.quick else TRIALS
    if args.trials < 1:
        p.error("--trials: expected a positive integer")
    if args.threads is not None and args.threads < 1:
        p.error("--threads: expected a positive integer")
    try:
        memory.require(gemm_bytes(args, torch.cuda.is_available() and not args.interpret),
                       "bench kernels (the largest GEMM's operands, their copies and outputs)")
    except memory.InsufficientMemory as e:
        p.error(f"--m/--n-div/--k-div: {e}")
    results_io.check_outputs(p, args.out, {"--json": args.json})
    return args


GEMM_COPY_BYTES = 16  # bytes per operand/output element across a GEMM row's copies: fp32 source,
# bf16 and fp8 copies, the twin's fp32 dequantized operands and fp32/bf16 outputs


def _gemm_shapes(args: argparse.Namespace, on_gpu: bool) -> list[tuple[str, int, int, int]]:
    """The (shape name, M, N, K) of every fp8 GEMM row the run times: DeepSeek-V3's shapes, N and K
    divided by --n-div/--k-div on a CPU."""
    shapes = roofline.V3_GEMM_SHAPES[:3] if args.quick else roofline.V3_GEMM_SHAPES
    ms = args.m or (roofline.V3_M_VALUES if on_gpu else (QUICK_M_VALUES if args.quick else CPU_M_VALUES))
    n_div, k_div = (64, 16) if args.quick and not on_gpu else (args.n_div, args.k_div)
    return [(name, m, n_full if on_gpu else max(reference.BLOCK, n_full // n_div),
             k_full if on_gpu else max(reference.BLOCK, k_full // k_div))
            for name, n_full, k_full in shapes for m in ms]


def gemm_bytes(args: argparse.Namespace, on_gpu: bool) -> int:
    """Host memory of the largest GEMM row (its operands are made on the host first)."""
    return max(GEMM_COPY_BYTES * (m * k + n * k + m * n) for _, m, n, k in _gemm_shapes(args, on_gpu))


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import triton  # noqa: PLC0415

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def time_cpu(fn: Callable[[], object], trials: int = TRIALS) -> float:
    """Minimum wall time in seconds over `trials` calls after WARMUP calls.

    The minimum, not the median: on a shared CPU other processes only ever add time, so the
    fastest run is the best estimate of the op's own cost.
    """
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def time_gpu(fn: Callable[[], object]) -> float:
    """Median seconds from triton.testing.do_bench (warm-up, L2 flushed between repetitions)."""
    import triton.testing  # noqa: PLC0415

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def _fp8_operands(m: int, n: int, k: int, device: torch.device, gen: torch.Generator):
    x = torch.randn(m, k, generator=gen).to(device)
    w = (torch.randn(n, k, generator=gen) * 0.02).to(device)
    a, a_s = reference.act_quant(x)
    q, w_s = reference.weight_quant(w)
    return x.bfloat16(), w.bfloat16(), a, a_s, q, w_s


def _gemm_rows(args: argparse.Namespace, device: torch.device, on_gpu: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for name, m, n, k in _gemm_shapes(args, on_gpu):
        xb, wb, a, a_s, q, w_s = _fp8_operands(m, n, k, device, gen)
        flops, nbytes = roofline.gemm_flops(m, n, k), roofline.fp8_gemm_bytes(m, n, k)
        row = {"op": "fp8_gemm", "shape": name, "M": m, "N": n, "K": k}
        bf16_fn = lambda: F.linear(xb, wb)  # noqa: E731
        t_bf16 = time_gpu(bf16_fn) if on_gpu else time_cpu(bf16_fn, args.trials)
        row["bf16_linear_s"] = t_bf16
        if on_gpu:
            from deepseek_model.kernels import triton_ops  # noqa: PLC0415

            t = time_gpu(lambda: triton_ops.fp8_gemm(a, a_s, q, w_s, torch.bfloat16))
            floor = roofline.fp8_gemm_floor(m, n, k)
            row.update(triton_s=t, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9,
                       pct_of_floor=100.0 * floor / t,
                       bf16_pct_of_floor=100.0 * roofline.bf16_gemm_floor(m, n, k) / t_bf16,
                       speedup_vs_bf16=t_bf16 / t, scaled_mm_s=_scaled_mm_time(a, q, m, n))
        else:
            t = time_cpu(lambda: reference.fp8_gemm(a, a_s, q, w_s, torch.bfloat16), args.trials)
            row.update(twin_s=t, gflops=flops / t / 1e9, gbps=nbytes / t / 1e9,
                       ratio_vs_bf16=t / t_bf16)
        rows.append(row)
    return rows


def _scaled_mm_time(a: torch.Tensor, q: torch.Tensor, m: int, n: int) -> float | None:
    """torch._scaled_mm with per-row / per-column fp32 scales (not block scales), if it runs."""
    try:
        sa = torch.ones(m, 1, device=a.device)
        sb = torch.ones(1, n, device=a.device)
        return time_gpu(lambda: torch._scaled_mm(a, q.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
    except (RuntimeError, TypeError):
        return None


def _act_quant_rows(args: argparse.Namespace, device: torch.device, on_gpu: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + 1)
    k = 7168 if not args.quick else 1024
    ms = (1, 64, 4096) if on_gpu else ((1, 16) if args.quick else (1, 64, 512))
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(device).bfloat16()
        nbytes = roofline.act_quant_bytes(m, k)
        row = {"op": "act_quant", "shape": f"bf16 [M, {k}]", "M": m, "K": k}
        if on_gpu:
            from deepseek_model.kernels import triton_ops  # noqa: PLC0415

            t = time_gpu(lambda: triton_ops.act_quant(x, reference.BLOCK, None))
            row.update(triton_s=t, gbps=nbytes / t / 1e9,
                       pct_of_floor=100.0 * nbytes / (roofline.H100_SXM.hbm_tbps * 1e12) / t)
        else:
            t = time_cpu(lambda: reference.act_quant(x), args.trials)
            row.update(twin_s=t, gbps=nbytes / t / 1e9)
        rows.append(row)
    return rows


def _random_fp8(shape: tuple[int, ...], device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Random finite e4m3 codes (NaN codes 0x7F/0xFF avoided), magnitudes up to 2."""
    codes = torch.randint(0, 0x40, shape, generator=gen, dtype=torch.uint8)  # |v| < 2
    codes |= torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8) << 7  # random sign
    return codes.view(reference.FP8_DTYPE).to(device)


def _moe_inputs(cfg: dict, tokens: int, device: torch.device, gen: torch.Generator):
    e, top_k, hid, inter = cfg["experts"], cfg["topk"], cfg["hidden"], cfg["inter"]
    w13 = _random_fp8((e, 2 * inter, hid), device, gen)
    w2 = _random_fp8((e, hid, inter), device, gen)
    w13_s = (torch.rand(e, -(-2 * inter // 128), -(-hid // 128), generator=gen) * 1e-2).to(device)
    w2_s = (torch.rand(e, -(-hid // 128), -(-inter // 128), generator=gen) * 1e-2).to(device)
    ids = torch.rand(tokens, e, generator=gen).topk(top_k, dim=1).indices.to(device)  # (T, topk)
    weights = torch.rand(tokens, top_k, generator=gen).to(device)
    x = torch.randn(tokens, hid, generator=gen).to(device).bfloat16()
    return x, weights, ids, w13, w13_s, w2, w2_s


def _moe_bf16_peer(x, weights, ids, w13_bf, w2_bf):
    """The same routed experts with bf16 weights and F.linear, one expert at a time."""
    inter = w13_bf.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        gu = F.linear(x[tok], w13_bf[e])  # (n_e, 2I)
        y = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2_bf[e])  # (n_e, H)
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(x.dtype)


def _moe_rows(args: argparse.Namespace, device: torch.device, on_gpu: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + 2)
    cfg = ({"experts": 256, "topk": 8, "hidden": 7168, "inter": 2048} if on_gpu
           else (QUICK_MOE_CFG if args.quick else MOE_CFG))
    token_counts = (1, 16, 64, 128) if on_gpu else ((1, 16) if args.quick else (1, 16, 64))
    rows = []
    for tokens in token_counts:
        x, weights, ids, w13, w13_s, w2, w2_s = _moe_inputs(cfg, tokens, device, gen)
        nbytes = roofline.moe_bytes(tokens, cfg["topk"], cfg["experts"], cfg["hidden"], cfg["inter"])
        flops = roofline.moe_flops(tokens, cfg["topk"], cfg["hidden"], cfg["inter"])
        row = {"op": "fused_moe", "shape": "E{experts} top{topk} H{hidden} I{inter}".format(**cfg), "M": tokens}
        def timer(fn):
            return time_gpu(fn) if on_gpu else time_cpu(fn, args.trials)

        if on_gpu:
            from deepseek_model.kernels import triton_ops  # noqa: PLC0415

            t = timer(lambda: triton_ops.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s))
            floor = roofline.floor_seconds(flops, nbytes, roofline.H100_SXM.fp8_tflops, roofline.H100_SXM.hbm_tbps)
            row.update(triton_s=t, tflops=flops / t / 1e12, gbps=nbytes / t / 1e9, pct_of_floor=100.0 * floor / t)
        else:
            w13_bf = torch.stack([reference.weight_dequant(w13[e], w13_s[e], 128, torch.bfloat16)
                                  for e in range(cfg["experts"])])
            w2_bf = torch.stack([reference.weight_dequant(w2[e], w2_s[e], 128, torch.bfloat16)
                                 for e in range(cfg["experts"])])
            t = timer(lambda: reference.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s))
            t_peer = timer(lambda: _moe_bf16_peer(x, weights, ids, w13_bf, w2_bf))
            row.update(twin_s=t, gflops=flops / t / 1e9, gbps=nbytes / t / 1e9, bf16_loop_s=t_peer,
                       ratio_vs_bf16=t / t_peer)
        rows.append(row)
    return rows


def _mla_rows(args: argparse.Namespace, device: torch.device, on_gpu: bool) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed + 3)
    cfg = ({"heads": 128, "kv_lora_rank": 512, "rope": 64, "seq": 4096} if on_gpu
           else (QUICK_MLA_CFG if args.quick else MLA_CFG))
    h, c, r, seq = cfg["heads"], cfg["kv_lora_rank"], cfg["rope"], cfg["seq"]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    rows = []
    for batch in ((1, 8, 64) if on_gpu else ((1, 2) if args.quick else (1, 4))):
        q = torch.randn(batch, h, c + r, generator=gen).to(device, dtype)  # (B, H, C+R)
        cache = torch.randn(batch, seq, c + r, generator=gen).to(device, dtype)  # (B, S, C+R)
        lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
        args_ = (q[..., :c], q[..., c:], cache[..., :c], cache[..., c:], lens, (c + r) ** -0.5)
        nbytes = roofline.mla_decode_bytes(batch, seq, h, c + r, c, cache.element_size())
        row = {"op": "mla_decode", "shape": f"H{h} C{c}+R{r} S{seq} {str(dtype).split('.')[-1]}", "M": batch}
        if on_gpu:
            from deepseek_model.kernels import triton_ops  # noqa: PLC0415

            t = time_gpu(lambda: triton_ops.mla_decode(*args_))
            row.update(triton_s=t, gbps=nbytes / t / 1e9,
                       pct_of_floor=100.0 * nbytes / (roofline.H100_SXM.hbm_tbps * 1e12) / t)
        else:
            qb, kb = q.bfloat16().unsqueeze(2), cache.bfloat16().unsqueeze(1).expand(batch, h, seq, c + r)
            t = time_cpu(lambda: reference.mla_decode(*args_), args.trials)
            t_peer = time_cpu(lambda: F.scaled_dot_product_attention(qb, kb, kb[..., :c], scale=args_[-1]),
                               args.trials)
            row.update(twin_s=t, gbps=nbytes / t / 1e9, bf16_sdpa_s=t_peer, ratio_vs_bf16=t / t_peer)
        rows.append(row)
    return rows


def _write_outputs(report: dict, out_dir: Path, json_file: str | None) -> list[Path]:
    """results.json, results.md and results.png in out_dir (and the JSON at json_file), all or none."""
    return results_io.write_run(out_dir, json_file, json.dumps(report, indent=2), _markdown(report),
                                lambda path: _plot(report, path))


def _fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    on_gpu = report["gpu_present"]
    parts = ["# bench kernels", "", f"**{report['statement']}**", "",
             f"device: {report['device']} · torch {report['versions']['torch']} · "
             f"triton {report['versions']['triton']} · timer: {report['timer']}", ""]
    groups: dict[str, list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault(r["op"], []).append(r)
    for op, rows in groups.items():
        cols = [c for c in rows[0] if c != "op"]
        for r in rows[1:]:
            cols += [c for c in r if c not in cols and c != "op"]
        parts += [f"## {op}", "", table(rows, cols), ""]
    if not on_gpu:
        parts += ["ratio_vs_bf16 = fp8 twin time / bf16 peer time at the same shape in the same run "
                  "(> 1: the fp8 twin is slower on this CPU). Peers: F.linear (fp8_gemm), a bf16 "
                  "per-expert F.linear loop (fused_moe), bf16 scaled_dot_product_attention over the "
                  "576-wide keys (mla_decode). GPU columns (% of roofline floor) are not reported: "
                  "no GPU present.", ""]
    if report.get("interpret_checks"):
        parts += ["## Triton interpreter checks (correctness only, vs the torch twins)", "",
                  table(report["interpret_checks"], ["op", "shape", "metric", "value", "ok"]), ""]
    return "\n".join(parts)


def _plot(report: dict, path: Path) -> bool:
    """Write the plot; False when matplotlib is missing."""
    plt = plotting.pyplot(str(path))
    if plt is None:
        return False

    on_gpu = report["gpu_present"]
    key = "pct_of_floor" if on_gpu else "ratio_vs_bf16"
    fig, (ax_gemm, ax_other) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, ops_ in ((ax_gemm, ("fp8_gemm",)), (ax_other, ("fused_moe", "mla_decode"))):
        rows = [r for r in report["rows"] if r["op"] in ops_ and r.get(key) is not None]
        for label in dict.fromkeys((r["op"], r["shape"]) for r in rows):
            pts = [(r["M"], r[key]) for r in rows if (r["op"], r["shape"]) == label]
            name = label[1] if len(ops_) == 1 else f"{label[0]} {label[1]}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens) / batch (MLA)")
        ax.set_ylabel("% of H100 roofline floor" if on_gpu else "twin time / bf16 peer time")
        if rows:
            ax.legend(fontsize=7)
    where = "Triton on GPU" if on_gpu else "torch twins on CPU — no GPU present"
    ax_gemm.set_title(f"fp8_gemm, {where}", fontsize=9)
    ax_other.set_title(f"fused MoE / MLA decode, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def _check(op: str, shape: str, metric: str, value: float | bool, ok: bool) -> dict:
    return {"op": op, "shape": shape, "metric": metric, "value": value, "ok": bool(ok)}


def _interpret_checks(args: argparse.Namespace) -> list[dict]:
    """Run the Triton kernels in the interpreter on small shapes; compare with their twins."""
    from deepseek_model.kernels import triton_ops  # noqa: PLC0415
    from deepseek_model.kernels.tiles import TileConfig  # noqa: PLC0415

    gen = torch.Generator().manual_seed(args.seed)
    checks = []
    x = torch.randn(77, 320, generator=gen) * 3
    for fmt in (None, "ue8m0"):
        y, s = triton_ops.act_quant(x, reference.BLOCK, fmt)
        y_ref, s_ref = reference.act_quant(x, reference.BLOCK, fmt)
        same = torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        checks.append(_check("act_quant", f"[77, 320] scale_fmt={fmt}", "byte-exact", same, same))
    q, w_s = reference.weight_quant(torch.randn(576, 320, generator=gen) * 0.02)
    for dtype in (torch.float32, torch.bfloat16):
        same = torch.equal(triton_ops.weight_dequant(q, w_s, reference.BLOCK, dtype),
                           reference.weight_dequant(q, w_s, reference.BLOCK, dtype))
        checks.append(_check("weight_dequant", f"[576, 320] -> {dtype}", "exact", same, same))
    a, a_s = reference.act_quant(x)
    ms = (1, 77) if not args.quick else (1,)
    for m in ms:
        want = reference.fp8_gemm(a[:m], a_s[:m], q, w_s, torch.float32)
        for split in (1, 3):
            cfg = TileConfig(BLOCK_M=16 if m == 1 else 64, BLOCK_N=128, SPLIT_K=split)
            got = triton_ops.fp8_gemm(a[:m], a_s[:m], q, w_s, torch.float32, config=cfg)
            err = rel_err(got, want)
            checks.append(_check("fp8_gemm", f"M={m} N=576 K=320 split_k={split}", "max rel err vs twin",
                                 err, err <= 1e-5))
    x, weights, ids, w13, w13_s, w2, w2_s = _moe_inputs(QUICK_MOE_CFG, 5, torch.device("cpu"), gen)
    x = x.float()
    err = rel_err(triton_ops.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s),
                   reference.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s))
    checks.append(_check("fused_moe", "T=5 E4 top2 H256 I128", "max rel err vs twin", err, err <= 1e-5))
    q = torch.randn(2, 4, 80, generator=gen)  # (B, H, 64 + 16)
    cache = torch.randn(2, 70, 80, generator=gen)  # (B, S, 64 + 16)
    lens = torch.tensor([70, 23])
    mla_args = (q[..., :64], q[..., 64:], cache[..., :64], cache[..., 64:], lens, 0.125)
    err = rel_err(triton_ops.mla_decode(*mla_args, num_splits=3), reference.mla_decode(*mla_args))
    checks.append(_check("mla_decode", "B2 H4 C64+R16 S70 lens(70,23) splits=3", "max rel err vs twin",
                         err, err <= 1e-5))
    return checks


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark; return 0 on success, 1 if an interpreter check failed."""
    args = _parse(argv)
    on_gpu = torch.cuda.is_available() and not args.interpret
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        if "deepseek_model.kernels.fp8_quant" in sys.modules:
            print("error: --interpret needs TRITON_INTERPRET=1 before the kernels are imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # read by triton when the kernels are decorated
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                                f"{torch.get_num_threads()} threads)",
        "gpu_present": on_gpu,
        "statement": ("GPU timings (triton.testing.do_bench, L2 flushed, warm-up); % of floor vs the "
                      "H100 SXM paper roofline" if on_gpu else NO_GPU),
        "timer": ("triton.testing.do_bench median" if on_gpu
                  else f"time.perf_counter, minimum of {args.trials} runs after {WARMUP} warm-up"),
        "versions": versions(),
        "config": {k: v for k, v in vars(args).items()},
        "rows": [],
    }
    report["rows"] += _gemm_rows(args, device, on_gpu)
    report["rows"] += _act_quant_rows(args, device, on_gpu)
    report["rows"] += _moe_rows(args, device, on_gpu)
    report["rows"] += _mla_rows(args, device, on_gpu)
    ok = True
    if args.interpret:
        checks = _interpret_checks(args)
        report["interpret_checks"] = checks
        ok = all(c["ok"] for c in checks)
    out_dir = Path(args.out)
    wrote = _write_outputs(report, out_dir, args.json)
    print(_markdown(report))
    print("wrote " + ", ".join(str(path) for path in wrote))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
