"""gpu_check without a GPU: --smoke runs every Triton kernel against its twin in the interpreter and writes
both result files; the GPU mode refuses in one line; the GPU-only figure code runs with a stand-in timer."""

import ast
import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_model.benchmarks import gpu_check, roofline
from deepseek_model.kernels import tiles

KERNEL_DIR = Path(tiles.__file__).parent
REPORT_KEYS = {"mode", "statement", "device", "versions", "peak", "timer", "bounds", "kernels", "correctness",
               "gemm", "bandwidth", "tune", "skipped", "complete", "all_pass", "seconds", "legend"}
GPU_FIGURE_SUFFIXES = ("_us", "_gbps", "_tflops", "_pct_hbm", "_pct_peak", "_pct_floor")
STAND_IN_SECONDS = 1e-3
TRITON_OPS = ("act_quant", "weight_dequant", "fp8_gemm", "fused_moe", "mla_decode", "index_logits", "sparse_mla_decode")
BANDWIDTH_OPS = {"act_quant", "weight_dequant", "fused_moe", "mla_decode", "index_logits", "sparse_mla_decode"}


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "jit") or (
        isinstance(target, ast.Name) and target.id == "jit")


def _scan_kernels() -> tuple[dict[str, str], set[str]]:
    """From the source of kernels/*.py: (launched kernel -> its module, every @triton.jit kernel).

    A @triton.jit function that returns a value is a device helper (e4m3_code, grouped_pid, ...);
    one that returns nothing is a kernel, started as `kernel[grid](...)`.
    """
    launched, kernels = {}, set()
    for path in sorted(KERNEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        jit = [f for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(_is_jit, f.decorator_list))]
        kernels |= {f.name for f in jit
                    if not any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(f))}
        names = {f.name for f in jit}
        for node in ast.walk(tree):  # kernel[grid](...)
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in names):
                launched[node.func.value.id] = path.stem
    return launched, kernels


def _triton_dispatch() -> set[str]:
    """The ops that kernels/ops.py sends to Triton: every `_triton_ops().NAME(...)` call."""
    tree = ast.parse((KERNEL_DIR / "ops.py").read_text(encoding="utf-8"))
    return {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Call) and getattr(n.func.value.func, "id", None) == "_triton_ops"}


class _Recorder:
    """Stands in for a Triton kernel in its module: notes the launch, then launches the kernel."""

    def __init__(self, kernel, name: str, seen: set[str]):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        self.seen.add(self.name)
        return self.kernel[grid]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One in-process `--smoke --tune` run, every Triton kernel wrapped to record that it ran."""
    out = tmp_path_factory.mktemp("gpu_check")
    launched, _ = _scan_kernels()
    seen: set[str] = set()
    with pytest.MonkeyPatch.context() as mp:
        for name, stem in launched.items():
            module = importlib.import_module(f"deepseek_model.kernels.{stem}")
            mp.setattr(module, name, _Recorder(getattr(module, name), name, seen))
        rc = gpu_check.main(["--smoke", "--tune", "--out", str(out)])
    stem = out / gpu_check.slug(gpu_check.SMOKE_DEVICE_NAME)
    return {"rc": rc, "out": out, "seen": seen, "launched": launched,
            "report": json.loads(stem.with_suffix(".json").read_text(encoding="utf-8")),
            "md": stem.with_suffix(".md").read_text(encoding="utf-8")}


def test_smoke_passes_and_writes_both_files(smoke):
    report = smoke["report"]
    assert smoke["rc"] == gpu_check.EXIT_OK
    assert REPORT_KEYS <= set(report)
    assert report["mode"] == "smoke" and report["all_pass"] and report["complete"] and not report["skipped"]
    assert {"torch", "triton", "python"} <= set(report["versions"])
    rows = report["correctness"]
    assert rows and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    for r in rows:
        if r["op"] in ("act_quant", "weight_dequant"):
            assert r["bound"] == gpu_check.EXACT and r["value"] == 0
        else:
            assert isinstance(r["bound"], float) and 0 <= r["value"] <= r["bound"]
    assert all(r["splits"] > 1 for r in rows if r["op"] == "fp8_gemm split-K")
    assert any("column-major" in r["case"] for r in rows if r["op"] == "act_quant")
    assert report["gemm"] and {r["op"] for r in report["bandwidth"]} == BANDWIDTH_OPS
    assert report["bounds"]["index_logits"] == gpu_check.INDEX_ACC_BOUND
    assert report["bounds"]["sparse_mla_decode"] == gpu_check.MLA_BOUND
    dsa_cases = [r["case"] for r in rows if r["op"] == "sparse_mla_decode"]
    assert any("-1" in case for case in dsa_cases) and any("splits=" in case for case in dsa_cases)
    md = smoke["md"]
    assert "not GPU figures" in md and "all checks pass" in md and "## Correctness" in md
    assert all(f"| {op} |" in md for op in TRITON_OPS)
    assert "index_logits: " in md and "sparse_mla_decode: " in md  # the bounds line


def test_smoke_reports_no_gpu_figure(smoke):
    report = smoke["report"]
    rows = report["gemm"] + report["bandwidth"] + report["tune"]["rows"]
    for r in rows:
        assert not [k for k in r if k.endswith(GPU_FIGURE_SUFFIXES) or "speedup" in k], r
    assert all(k.endswith("_cpu_s") for r in rows for k in r if k.endswith("_s"))
    assert all(r["scaled_mm"] in ("torch._scaled_mm", "F.scaled_mm") or r["scaled_mm"].startswith("unsupported")
               for r in report["gemm"])
    assert report["peak"].startswith("none") and "not GPU figures" in report["timer"]


def test_every_triton_kernel_is_checked(smoke):
    """A kernel added to kernels/ without a case in the check fails here."""
    launched, kernels = _scan_kernels()
    assert kernels == set(launched) == {name for name, _ in gpu_check.KERNELS}
    assert smoke["seen"] == set(launched)  # every kernel really ran during the smoke check
    ops = {r["op"] for r in smoke["report"]["correctness"]}
    assert {op for _, op in gpu_check.KERNELS} <= ops
    assert _triton_dispatch() == set(TRITON_OPS)
    assert _triton_dispatch() <= ops


def test_smoke_tune_writes_a_loadable_table_beside_the_results(smoke):
    path = smoke["out"] / "tiles.json"
    tune = smoke["report"]["tune"]
    assert tune["file"] == str(path) and tune["rows"]
    assert all(r["result"] in ("kept", "written") for r in tune["rows"])
    table = json.loads(path.read_text(encoding="utf-8"))
    package = json.loads(tiles.TILES_FILE.read_text(encoding="utf-8"))
    assert {"default", "shapes", "moe"} <= set(table) and table["default"] == package["default"]
    assert all(table["shapes"][shape] == entry for shape, entry in package["shapes"].items())
    assert isinstance(tiles.get_tile(192, 256, 3, path), tiles.TileConfig)


def test_gpu_mode_refuses_without_a_gpu_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the GPU mode would run")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "deepseek_model.benchmarks.gpu_check", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == gpu_check.EXIT_REFUSED
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device"), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_smoke_tune_refuses_to_write_the_package_table(tmp_path, capsys):
    argv = ["--smoke", "--tune", "--tiles-out", str(tiles.TILES_FILE), "--out", str(tmp_path)]
    assert gpu_check.main(argv) == gpu_check.EXIT_REFUSED
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_time_budget_skips_items_and_says_so(tmp_path):
    assert gpu_check.main(["--smoke", "--max-seconds", "0", "--out", str(tmp_path)]) == gpu_check.EXIT_INCOMPLETE
    report = json.loads((tmp_path / "cpu-triton-interpreter.json").read_text(encoding="utf-8"))
    assert not report["complete"] and report["skipped"] and not report["correctness"]
    assert "Skipped (time budget)" in (tmp_path / "cpu-triton-interpreter.md").read_text(encoding="utf-8")


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--help"])
    assert exc.value.code == 0 and "--tune" in capsys.readouterr().out


def test_gpu_figures_from_a_stand_in_timer(monkeypatch, tmp_path):
    """The GPU-only arithmetic (TFLOP/s, % of peak, % of floor, GB/s, % of HBM, speedups) on CPU
    kernels with do_bench replaced by a fixed time."""
    from deepseek_model.kernels import triton_ops

    monkeypatch.setattr(gpu_check, "time_gpu", lambda fn: (fn(), STAND_IN_SECONDS)[1])
    plan = dataclasses.replace(gpu_check.SMOKE_PLAN, gemm_perf_m=(3,), moe_perf_tokens=(2,))
    run = gpu_check.Run(plan=plan, device=torch.device("cpu"), timer=gpu_check.Timer(cuda=True),
                        peak=roofline.H200, budget=gpu_check.Budget(float("inf")), tiles_in=tiles.TILES_FILE,
                        tiles_out=None, out_dir=tmp_path, seed=0, report={})
    (row,) = gpu_check._gemm_perf(run, triton_ops)
    m, n, k = row["M"], row["N"], row["K"]
    flops, nbytes = roofline.gemm_flops(m, n, k), roofline.fp8_gemm_bytes(m, n, k)
    assert row["triton_us"] == pytest.approx(STAND_IN_SECONDS * 1e6)
    assert row["triton_tflops"] == pytest.approx(flops / STAND_IN_SECONDS / 1e12)
    assert row["triton_pct_peak"] == pytest.approx(100 * flops / (roofline.H200.fp8_tflops * 1e12) / STAND_IN_SECONDS)
    assert row["triton_pct_floor"] == pytest.approx(100 * roofline.fp8_gemm_floor(m, n, k, roofline.H200)
                                                    / STAND_IN_SECONDS)
    assert row["triton_gbps"] == pytest.approx(nbytes / STAND_IN_SECONDS / 1e9)
    assert row["bf16_matmul_pct_floor"] == pytest.approx(100 * roofline.bf16_gemm_floor(m, n, k, roofline.H200)
                                                         / STAND_IN_SECONDS)
    assert row["triton_speedup_vs_bf16"] == pytest.approx(1.0) and row["bound"] == "memory"
    assert row["scaled_mm"].startswith("unsupported")  # CPU torch has no blockwise fp8 GEMM
    bandwidth = gpu_check._bandwidth_perf(run, triton_ops)
    assert {r["op"] for r in bandwidth} == BANDWIDTH_OPS
    for r in bandwidth:
        assert r["triton_pct_hbm"] == pytest.approx(100 * r["triton_gbps"] / (roofline.H200.hbm_tbps * 1e3))
    for op in ("fused_moe", "index_logits"):
        r = next(r for r in bandwidth if r["op"] == op)
        assert r["triton_tflops"] > 0 and r["triton_pct_floor"] > 0
    (index,), (sparse,) = plan.index_perf, plan.sparse_perf
    idx_row = next(r for r in bandwidth if r["op"] == "index_logits")
    assert idx_row["triton_gbps"] == pytest.approx(roofline.index_logits_bytes(
        index.batch, index.tokens, index.keys, plan.index.heads, plan.index.dim) / STAND_IN_SECONDS / 1e9)
    sparse_row = next(r for r in bandwidth if r["op"] == "sparse_mla_decode")
    kv_dim = plan.mla.rank + plan.mla.rope  # bf16 cache and q, int64 indices, fp32 o_lat
    assert sparse_row["triton_gbps"] == pytest.approx(sparse.batch * (
        sparse.topk * (kv_dim * 2 + 8) + sparse.heads * (kv_dim * 2 + plan.mla.rank * 4)) / STAND_IN_SECONDS / 1e9)


def test_device_peak_table():
    assert gpu_check.device_peak("NVIDIA H200") is roofline.H200
    assert gpu_check.device_peak("NVIDIA H100 80GB HBM3") is roofline.H100_SXM
    for name in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB"):
        assert gpu_check.device_peak(name) is None, name
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_tile_table_writer_keeps_the_file_format(tmp_path):
    text = tiles.TILES_FILE.read_text(encoding="utf-8")
    assert tiles.format_tiles(json.loads(text)) == text
    table = json.loads(text)
    table["shapes"]["256x512"] = {"m16": {"BLOCK_M": 16, "BLOCK_N": 32, "GROUP_M": 1, "SPLIT_K": 2,
                                          "num_warps": 4, "num_stages": 3}}
    path = tmp_path / "tiles.json"
    tiles.write_tiles(table, path, 128)
    assert tiles.get_tile(256, 512, 1, path) == tiles.TileConfig(16, 32, 1, 2, 4, 3)
    table["shapes"]["256x512"]["m16"]["BLOCK_N"] = 48  # not a power of two: a GPU could not build it
    with pytest.raises(ValueError, match="BLOCK_N"):
        tiles.write_tiles(table, path, 128)
