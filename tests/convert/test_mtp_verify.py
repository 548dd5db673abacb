"""strip-mtp, --dedupe-mtp, and the verify report (JSON + summary line, missing/mismatch detection)."""

from __future__ import annotations

import json
import os

import torch
from convert_helpers import read_json, run_cli, run_inproc

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.config import ModelConfig
from deepseek_model.convert.fp8 import bf16_to_fp8, fp8_to_bf16
from deepseek_model.convert.mtp import strip_mtp
from deepseek_model.convert.verify import verify
from deepseek_model.checkpoint.writer import write_checkpoint
from deepseek_model.testing import make_tiny_tensors


def test_strip_mtp_copies_the_rest_byte_for_byte(tiny_fp8, tmp_path):
    strip_mtp(tiny_fp8, tmp_path / "out", quiet=True)
    src, out = CheckpointReader(tiny_fp8), CheckpointReader(tmp_path / "out")
    layers = src.config()["num_hidden_layers"]
    kept = [n for n in src.names() if (schema.layer_index(n) or 0) < layers]
    assert sorted(out.names()) == sorted(kept) and len(kept) < len(src.names())
    for name in kept:
        assert out.dtype(name) == src.dtype(name)
        assert torch.equal(out.get(name).view(torch.uint8), src.get(name).view(torch.uint8)), name
    config = out.config()
    assert config["num_nextn_predict_layers"] == 0 and "quantization_config" in config
    assert run_inproc("strip-mtp", tmp_path / "out", tmp_path / "again").stderr.startswith("error: ")


def test_dedupe_mtp_drops_only_identical_copies(tiny_fp8, tmp_path):
    fp8_to_bf16(tiny_fp8, tmp_path / "dedup", dedupe_mtp=True, quiet=True)
    out = CheckpointReader(tmp_path / "dedup")
    layer = out.config()["num_hidden_layers"]
    assert f"model.layers.{layer}.embed_tokens.weight" not in out
    assert f"model.layers.{layer}.shared_head.head.weight" not in out
    assert f"model.layers.{layer}.eh_proj.weight" in out and out.config()["num_nextn_predict_layers"] == 1
    # verify resolves a deduplicated copy to the main tensor: everything equal
    fp8_to_bf16(tiny_fp8, tmp_path / "full", quiet=True)
    summary = verify(tmp_path / "full", tmp_path / "dedup")["summary"]
    assert summary["ok"] and summary["exact"] == summary["compared"] == summary["tensors"]
    # a copy that differs is kept
    cfg = ModelConfig.builtin("tiny")
    tensors = make_tiny_tensors(cfg)
    tensors[f"model.layers.{layer}.embed_tokens.weight"][0, 0] += 1
    src = write_checkpoint(tmp_path / "differs", tensors, cfg.to_dict())
    bf16_to_fp8(src, tmp_path / "d2", dedupe_mtp=True, quiet=True)
    out2 = CheckpointReader(tmp_path / "d2")
    assert f"model.layers.{layer}.embed_tokens.weight" in out2
    assert f"model.layers.{layer}.shared_head.head.weight" not in out2


def test_verify_report_json_and_summary_line(tiny_fp8, tmp_path):
    fp8_to_bf16(tiny_fp8, tmp_path / "bf16", quiet=True)
    report_path = tmp_path / "report.json"
    proc = run_cli("verify", tiny_fp8, tmp_path / "bf16", "--json", report_path, "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("verify: OK") and len(proc.stdout.splitlines()) == 1
    report = read_json(report_path)
    entry = report["tensors"]["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert entry["dtype_a"] == "float8_e4m3fn" and entry["dtype_b"] == "bfloat16"
    assert 0 < entry["max_abs_err"] and entry["max_rel_err"] <= 2.0 ** -8  # only the bf16 rounding
    assert entry["fp8_blocks"] == 4 and entry["fp8_blocks_over_bound"] == 0  # 160x256 → 2x2 blocks
    assert report["tensors"]["model.norm.weight"]["exact"]
    assert report["summary"]["ok"] and report["summary"]["compared"] == len(report["tensors"])


def test_verify_flags_missing_and_different_tensors(tiny_fp8, tiny_bf16, tmp_path):
    strip_mtp(tiny_fp8, tmp_path / "nomtp", quiet=True)
    proc = run_inproc("verify", tiny_fp8, tmp_path / "nomtp", "-q")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    layer = read_json(os.path.join(tiny_fp8, "config.json"))["num_hidden_layers"]
    assert report["tensors"][f"model.layers.{layer}.enorm.weight"]["status"] == "missing_in_b"
    assert proc.stderr.startswith("verify: FAIL")
    # different weights (another seed): far outside the FP8 bound
    different = verify(tiny_fp8, tiny_bf16)
    assert not different["summary"]["ok"] and different["summary"]["fp8_blocks_over_bound"] > 0


def test_verify_fails_unrelated_checkpoints_of_the_same_shapes(tmp_path):
    cfg = ModelConfig.builtin("tiny")
    a = write_checkpoint(tmp_path / "a", make_tiny_tensors(cfg, seed=1), cfg.to_dict())
    b = write_checkpoint(tmp_path / "b", make_tiny_tensors(cfg, seed=5), cfg.to_dict())
    s = verify(a, b)["summary"]
    assert not s["ok"] and s["max_rel_err"] > 0.5
    assert verify(a, a)["summary"]["ok"]
    proc = run_cli("verify", a, b)
    assert proc.returncode == 1 and "verify: FAIL" in proc.stderr


def test_verify_passes_the_converters_own_output_at_rounding_ties(tmp_path):
    """Values on e4m3 rounding ties (s·(272 + 32k): halfway between neighbours of the top binade),
    with scales that are not powers of two: fp32 round-off may tip them, the bound allows for it."""
    cfg = ModelConfig.builtin("tiny")
    tensors = make_tiny_tensors(cfg, seed=3)
    gen = torch.Generator().manual_seed(0)
    for name, v in list(tensors.items()):
        if v.dim() == 2 and schema.is_fp8_weight(name):
            s = torch.rand(1, generator=gen).item() * 0.01 + 1e-3
            k = torch.randint(0, 6, tuple(v.shape), generator=gen).float()
            ties = s * (272 + 32 * k)
            ties[0, 0] = 448 * s
            tensors[name] = ties.to(torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, cfg.to_dict())
    bf16_to_fp8(src, tmp_path / "fp8", quiet=True)
    s = verify(src, tmp_path / "fp8")["summary"]
    assert s["ok"] and s["fp8_blocks"] > 0 and s["fp8_blocks_over_bound"] == 0


def test_verify_refuses_a_nan_threshold(tiny_fp8):
    proc = run_inproc("verify", tiny_fp8, tiny_fp8, "--max-rel", "nan")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --max-rel must be a finite number >= 0, got nan"


def test_verify_flags_a_nan_copied_unread(tmp_path):
    """shard/merge/strip-mtp copy tensors byte for byte; verify is where a NaN among them shows."""
    cfg = ModelConfig.builtin("tiny")
    tensors = make_tiny_tensors(cfg, fp8=False, seed=4)
    good = write_checkpoint(tmp_path / "good", tensors, cfg.to_dict())
    name = "model.layers.0.input_layernorm.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3] = float("nan")
    bad = write_checkpoint(tmp_path / "bad", tensors, cfg.to_dict())
    assert run_inproc("strip-mtp", bad, tmp_path / "copy", "-q").returncode == 0  # copied unread
    result = verify(good, str(tmp_path / "copy"))
    assert result["tensors"][name]["status"] == "nonfinite" and not result["summary"]["ok"]
    assert name in result["summary"]["first_not_ok"]
    assert run_inproc("verify", good, tmp_path / "copy", "-q", "--json", tmp_path / "r.json").returncode == 1
