"""shard / merge: per-rank slices, manifest, load_rank, exact round trip, refused world sizes."""

from __future__ import annotations

import pytest
import torch
from convert_helpers import run_cli, run_inproc

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.convert.shard import merge, shard
from deepseek_model.checkpoint.sharded import load_rank, read_manifest
from deepseek_model.convert.verify import verify


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("which", ["tiny_bf16", "aligned_fp8"])
def test_shard_then_merge_is_exact(which, request, tmp_path):
    src = request.getfixturevalue(which)
    proc = run_cli("shard", src, tmp_path / "tp2", "--model-parallel", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    assert merge(tmp_path / "tp2", tmp_path / "merged", quiet=True)["tensors"] > 0
    a, b = CheckpointReader(src), CheckpointReader(tmp_path / "merged")
    assert b.weight_map == a.weight_map  # same shard names and split as the source
    for name in a.names():
        assert _same_bytes(a.get(name), b.get(name)), name
    assert b.config() == a.config()
    summary = verify(src, tmp_path / "tp2")["summary"]
    assert summary["ok"] and summary["exact"] == summary["compared"]


def test_rank_contents_follow_the_split_rules(aligned_fp8, tmp_path):
    shard(aligned_fp8, tmp_path / "tp2", 2, quiet=True)
    manifest = read_manifest(tmp_path / "tp2")
    assert manifest["world_size"] == 2 and manifest["config"]["n_routed_experts"] == 8
    src = CheckpointReader(aligned_fp8)
    ranks = [load_rank(tmp_path / "tp2", r) for r in range(2)]
    expect = {
        "model.layers.1.self_attn.q_b_proj.weight": "column",
        "model.layers.1.self_attn.q_b_proj.weight_scale_inv": "column",
        "model.layers.1.self_attn.kv_b_proj.weight": "column",
        "model.layers.0.mlp.gate_proj.weight": "column",
        "model.layers.1.mlp.shared_experts.up_proj.weight": "column",
        "model.embed_tokens.weight": "column",
        "lm_head.weight": "column",
        "model.layers.1.self_attn.o_proj.weight": "row",
        "model.layers.1.self_attn.o_proj.weight_scale_inv": "row",
        "model.layers.0.mlp.down_proj.weight": "row",
        "model.layers.1.mlp.shared_experts.down_proj.weight": "row",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": "replicated",
        "model.layers.1.mlp.gate.weight": "replicated",
        "model.layers.1.mlp.gate.e_score_correction_bias": "replicated",
        "model.norm.weight": "replicated",
        "model.layers.1.mlp.experts.5.down_proj.weight": "expert",
    }
    for name, kind in expect.items():
        info = manifest["tensors"][name]
        assert info["split"] == kind, name
        full = src.get(name)
        if kind == "expert":
            owner = 5 // (8 // 2)
            assert info["rank"] == owner and name not in ranks[1 - owner]
            assert _same_bytes(ranks[owner][name], full)
            continue
        for r in range(2):
            part = ranks[r][name]
            if kind == "replicated":
                assert _same_bytes(part, full), name
            else:
                dim = 0 if kind == "column" else 1
                assert _same_bytes(part, full.chunk(2, dim=dim)[r].contiguous()), (name, r)
        assert manifest["ranks"][0]["weight_map"][name].endswith(".safetensors")
    q_scale = ranks[0]["model.layers.1.self_attn.q_b_proj.weight_scale_inv"]
    assert q_scale.shape[0] * 128 == ranks[0]["model.layers.1.self_attn.q_b_proj.weight"].shape[0]
    experts_on_0 = {schema.layer_index(n) for n in ranks[0] if ".mlp.experts." in n}
    assert experts_on_0 and all(int(n.split(".")[5]) < 4 for n in ranks[0] if ".mlp.experts." in n)


def test_invalid_world_size_refused_with_reason(tiny_fp8, tiny_bf16, tmp_path):
    proc = run_inproc("shard", tiny_fp8, tmp_path / "a", "-n", "2")
    assert proc.returncode == 2 and "128-block" in proc.stderr and ".weight" in proc.stderr
    proc = run_inproc("shard", tiny_bf16, tmp_path / "b", "-n", "3")
    assert proc.returncode == 2 and "not divisible by 3" in proc.stderr
    proc = run_inproc("shard", tiny_bf16, tmp_path / "c", "-n", "32")  # 16 experts, 4 heads
    assert proc.returncode == 2 and "num_attention_heads" in proc.stderr
    proc = run_inproc("shard", tiny_bf16, tmp_path / "d", "-n", "0")
    assert proc.returncode == 2 and ">= 1" in proc.stderr
    assert not any((tmp_path / x).exists() for x in "abcd")
    with pytest.raises(Exception, match="outside world size"):
        shard(tiny_bf16, tmp_path / "ok", 1, quiet=True)
        load_rank(tmp_path / "ok", 1)
