"""bench_kernels on CPU with --quick: writes JSON + markdown + PNG and says there is no GPU."""

import json

import torch

from deepseek_model.benchmarks import bench_kernels, roofline


def test_bench_quick_interpret_writes_report(tmp_path):
    out = tmp_path / "bench"
    extra = tmp_path / "copy.json"
    assert bench_kernels.main(["--quick", "--interpret", "--out", str(out), "--json", str(extra)]) == 0
    report = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert (out / "results.png").stat().st_size > 0 and extra.exists()
    if not torch.cuda.is_available():
        assert report["gpu_present"] is False
        assert "no GPU present" in report["statement"] and "no GPU present" in md
        assert all("pct_of_floor" not in r for r in report["rows"])
    assert {"torch", "triton", "python"} <= set(report["versions"])
    assert report["config"]["quick"] is True
    ops = {r["op"] for r in report["rows"]}
    assert {"fp8_gemm", "act_quant", "fused_moe", "mla_decode"} <= ops
    assert report["interpret_checks"] and all(c["ok"] for c in report["interpret_checks"])
    if not report["gpu_present"]:  # every CPU row carries its same-run ratio against a bf16 peer
        assert all(r["ratio_vs_bf16"] > 0 for r in report["rows"] if r["op"] != "act_quant")
    assert {c["op"] for c in report["interpret_checks"]} == {"act_quant", "weight_dequant", "fp8_gemm",
                                                             "fused_moe", "mla_decode"}


def test_roofline_formula_and_memory_bound_claim():
    m, n, k = 1, 2112, 7168
    assert roofline.fp8_gemm_bytes(m, n, k) == m * k + 4 * m * 56 + n * k + 4 * 17 * 56 + 2 * m * n
    for _, n, k in roofline.V3_GEMM_SHAPES:
        for m in (1, 16, 64, 128):
            assert roofline.is_memory_bound(m, n, k)  # every DeepSeek-V3 GEMM at M <= 128
    assert not roofline.is_memory_bound(4096, 7168, 18432)
