"""bench_model end to end on the smallest setting (the tiny config): both models timed, JSON +
markdown + PNG written, cache bytes per token as the formula says, V3 cache ratio above 71x."""

import json

import pytest

from deepseek_model.benchmarks import bench_model
from deepseek_model.config import ModelConfig


def test_bench_model_smallest(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    code = bench_model.main(["--config", "tiny", "--contexts", "16", "--batches", "1", "--no-compile", "--threads", "1",
                             "--sparse-contexts", "64", "--crossover-topk", "4", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().startswith("# bench_model")
    assert (tmp_path / "results.png").stat().st_size > 0
    row = report["rows"][0]
    assert report["gemm_GFLOPs"] > 0 and row["prefill_floor_s"] > 0
    assert report["config"] == "tiny"
    cfg16 = ModelConfig.builtin("tiny")
    want = 16 * bench_model.prefill_flops_per_token(cfg16, 16) / (report["gemm_GFLOPs"] * 1e9)
    assert abs(row["prefill_floor_s"] - want) <= 1e-9 * want  # the chunk's FLOPs at the measured GEMM rate
    assert abs(row["prefill_floor_ratio"] - 16 / row["ours"]["prefill_tok_s"] / want) <= 1e-6 * row["prefill_floor_ratio"]
    assert row["ours"]["decode_tok_s"] > 0 and row["hf"]["decode_tok_s"] > 0 and row["decode_ratio"] > 0
    cfg = ModelConfig.builtin("tiny")
    latent = cfg.latent_dim * 4 * cfg.num_hidden_layers  # fp32
    assert row["ours"]["cache_bytes_per_token"] == latent
    assert report["cache"]["tiny"]["latent"] == latent
    assert report["cache"]["v3"]["ratio"] > 71
    # transformers 5.x caches MLA's compressed latent too (and re-expands it every step): same bytes
    assert row["hf"]["cache_bytes_per_token"] in (latent, report["cache"]["tiny"]["per_head_kv"])
    assert report["hf_logit_max_diff"] < 1e-3
    assert 0 <= report["fp8_cache"]["argmax_agreement"] <= 1
    # the decode comparisons run at the shortest context asked for, after one prefill each
    assert report["weight_only_fp8"]["context"] == report["batch_invariant"]["context"] == 16
    assert report["weight_only_fp8"]["fp8_weight_bytes"] < report["weight_only_fp8"]["dense_weight_bytes"]
    assert all(report["batch_invariant"][f"batch{b}"]["slowdown"] > 0 for b in (1, 4))
    (sparse,) = report["sparse_attention"]  # V3.2 vs the same weights as V3 (the mechanics: a short context)
    assert sparse["context"] == 64 and sparse["index_topk"] == bench_model.SPARSE_TOPK
    assert sparse["prefill_ratio"] > 0 and sparse["decode_ratio"] > 0 and sparse["attention_ratio"] > 0
    assert "DeepSeek-V3.2 sparse attention" in (tmp_path / "results.md").read_text()
    crossover = report["sparse_prefill_crossover"]["rows"]  # the same weights with index_topk 4, at 4x, 16x, 32x it
    penalty = report["sparse_prefill_crossover"]["gather_penalty"]  # measured at the longest of them
    assert penalty["measured"] > 0 and penalty["index_topk"] == 4
    assert penalty["context"] == 4 * max(bench_model.CROSSOVER_MULTIPLES)
    assert [(r["index_topk"], r["context"]) for r in crossover] == [(4, 4 * m) for m in bench_model.CROSSOVER_MULTIPLES]
    assert all(r["prefill_ratio"] == r["prefill_s"]["dense"] / r["prefill_s"]["sparse"] > 0 for r in crossover)
    assert all(r["attention_ratio"] == r["attention_prefill_s"]["dense"] / r["attention_prefill_s"]["sparse"] > 0
               for r in crossover)
    assert "V3.2 prefill crossover" in (tmp_path / "results.md").read_text()
    assert f"V3.2 crossover prefill faster than dense, context {4 * max(bench_model.CROSSOVER_MULTIPLES)}" in \
        " ".join(report["goals"])  # the V3.2 goals join the run's goals


def test_bench_model_bf16_also_times_the_fp32_prefill(tmp_path):
    code = bench_model.main(["--config", "tiny", "--dtype", "bfloat16", "--contexts", "16", "--batches", "1",
                             "--no-compile", "--no-sparse", "--no-hf", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    bf = report["bf16_vs_fp32_prefill"]  # the largest context asked for when 1k is not among them
    assert bf["context"] == 16 and bf["batch"] == 1 and bf["cpu_has_amx"] == report["cpu"]["amx"]
    assert bf["ratio"] == bf["bf16_prefill_tok_s"] / bf["fp32_prefill_tok_s"] > 0
    (goal,) = [v for k, v in report["goals"].items() if k.startswith("bf16 prefill ≥ 2.5× float32 at 16")]
    assert goal == bench_model._bf16_goal(bf)
    assert "bfloat16 vs float32 prefill" in (tmp_path / "results.md").read_text()


def test_cpu_features_read_the_flags(tmp_path):
    amx = tmp_path / "amx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n\nflags\t: fpu\n")
    plain = tmp_path / "plain"
    plain.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n")
    got = bench_model.cpu_features(str(amx))
    assert got["amx"] and got["amx_tile"] and got["avx512_bf16"] and got["capability"]
    got = bench_model.cpu_features(str(plain))
    assert got["amx"] is False and got["avx512f"] and not got["avx512_bf16"]
    got = bench_model.cpu_features(str(tmp_path / "missing"))  # no flags to read: torch's probe, or unknown
    assert got["amx"] in (True, False, None) and "avx512f" not in got


@pytest.mark.parametrize("amx, ratio, verdict", [(True, 2.6, "2.60× (met)"), (True, 2.4, "2.40× (NOT met)"),
                                                 (False, 1.1, "not applicable: this CPU has no AMX (1.10× without it)"),
                                                 (None, 1.1, "1.10× (whether this CPU has AMX could not be read)")])
def test_bf16_goal_verdicts(amx, ratio, verdict):
    assert bench_model._bf16_goal({"ratio": ratio, "cpu_has_amx": amx}) == verdict
