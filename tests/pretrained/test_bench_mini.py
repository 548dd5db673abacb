"""`bench mini` end to end on the shipped checkpoint, with the test sample as the held-out text."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE_DIR = os.path.join(REPO, "tests", "data", "shakespeare_sample")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "bench", "mini", "--corpus", SAMPLE_DIR,
                        "--out", str(out), "--skip-training", "--prompts", "2"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "mini-shakespeare.json").read_text())


def test_files_written(result):
    out, _ = result
    for ext in ("json", "md", "png"):
        assert (out / f"mini-shakespeare.{ext}").stat().st_size > 500
    md = (out / "mini-shakespeare.md").read_text()
    assert "| w8a8 |" in md and "speculative" in md


def test_bits_per_byte_rows(result):
    _, res = result
    rows = {r["mode"]: r for r in res["bits_per_byte"]["rows"]}
    assert set(rows) == {"bf16", "fp8 weight-only", "fp8 weight-only + fp8 cache", "w8a8"}
    base = rows["bf16"]
    assert base["vs_bf16_pct"] == 0 and 0.5 < base["bits_per_byte"] < 4
    assert all(r["tokens"] == base["tokens"] and r["bytes"] == base["bytes"] for r in rows.values())
    # without --reference the FP8 checkpoint stands in for bf16: the weight-only row is the same model
    assert res["bits_per_byte"]["reference"] == "fp8-dequantized"
    assert abs(rows["fp8 weight-only"]["bits_per_byte"] - base["bits_per_byte"]) < 1e-9
    assert abs(rows["w8a8"]["vs_bf16_pct"]) < 5 and abs(rows["fp8 weight-only + fp8 cache"]["vs_bf16_pct"]) < 5
    tf = res["transformers"]
    assert tf["agreement_pct"] < 0.5


def test_speculative_section(result):
    _, res = result
    sp = res["speculative"]
    assert sp["prompts"] == 2 and sp["identical_outputs"] == "2/2" and sp["batch4"]["identical"]
    # the trained model drafts well (0.60 on these two short prompts; random weights give ~0)
    assert 0.5 <= sp["acceptance_rate"] <= 1 and sp["tokens_per_forward"] == pytest.approx(1 + sp["acceptance_rate"],
                                                                                        abs=0.1)
    assert len(res["samples"]) == 3 and all(s["continuation"] for s in res["samples"])
    steps = sp["step_breakdown_ms"]
    for key in ("main forward, 1 row", "main forward, 2 rows", "head, 1 row", "head, 2 rows", "MTP step, 1 row"):
        assert steps[key] > 0, key


def test_only_reruns_a_section_and_keeps_the_rest(result):
    out, before = result
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "bench", "mini", "--corpus", SAMPLE_DIR,
                        "--out", str(out), "--only", "samples"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    after = json.loads((out / "mini-shakespeare.json").read_text())
    assert after["bits_per_byte"] == before["bits_per_byte"] and after["speculative"] == before["speculative"]
    assert after["samples"] == before["samples"]  # seeded sampling: the same continuations
    assert after["commands"]["samples"].endswith("--only samples")
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "bench", "mini", "--corpus", SAMPLE_DIR,
                        "--out", str(out / "empty"), "--only", "samples"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--only needs the results of an earlier full run" in r.stderr
