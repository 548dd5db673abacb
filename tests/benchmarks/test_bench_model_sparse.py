"""`bench model --sparse-only`: the V3.2 sparse-vs-dense comparison alone, its files and its goals
(the mechanics, on the tiny config; the recorded figures come from the small one)."""

import json

import pytest

from deepseek_model.benchmarks import bench_model
from deepseek_model.cli import main


def test_sparse_only_writes_ratios_and_goals(tmp_path, capsys):
    out = tmp_path / "v32"
    code = main(["bench", "model", "--sparse-only", "--config", "tiny", "--threads", "1", "--quick",
                 "--sparse-contexts", "24", "24", "--crossover-topk", "2", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"results.json", "results.md"}
    assert "rows" not in report and report["config"] == "tiny"  # no V3 grid, no transformers
    (row,) = report["sparse_attention"]
    assert row["context"] == 24 and row["index_topk"] == bench_model.SPARSE_TOPK
    for key in ("prefill", "decode", "attention"):
        assert row[f"{key}_ratio"] > 0
    cross = report["sparse_prefill_crossover"]["rows"]
    assert [r["context"] for r in cross] == [m * 2 for m in bench_model.CROSSOVER_MULTIPLES]
    for r in cross:  # each ratio is dense time / sparse time, from the medians it was computed from
        assert r["prefill_ratio"] == pytest.approx(r["prefill_s"]["dense"] / r["prefill_s"]["sparse"])
        assert r["attention_ratio"] == pytest.approx(r["attention_prefill_s"]["dense"] / r["attention_prefill_s"]["sparse"])
    goals = report["goals"]
    assert len(goals) == 3 + 2 * len(cross)
    for r in cross:
        where = f"context {r['context']} = {r['multiple']} x index_topk 2"
        for goal, ratio in ((f"V3.2 crossover prefill faster than dense, {where}", r["prefill_ratio"]),
                            (f"V3.2 crossover prefill attention faster than dense, {where}", r["attention_ratio"])):
            assert goals[goal] == f"{ratio:.2f}× ({'met' if ratio > 1 else 'NOT met'})"
    # context 24 <= index_topk: every key is selected, so no verdict on speed
    where = f"context 24 = {24 / bench_model.SPARSE_TOPK:.3g} x index_topk {bench_model.SPARSE_TOPK}"
    for kind, key in (("decode step", "decode_ratio"), ("decode attention", "attention_ratio"),
                      ("prefill", "prefill_ratio")):
        assert goals[f"V3.2 {kind} faster than dense, {where}"].startswith(f"{row[key]:.2f}× (not applicable")
    md = (out / "results.md").read_text()
    assert "## Goals" in md and "prefill crossover" in md and "32 x index_topk" in md
    assert "goal: V3.2 crossover prefill faster than dense" in capsys.readouterr().out
