"""Split validity and per-rank memory (no processes): the rules `inspect --world-size` reports."""

import json

import pytest

from deepseek_model import cli, parallel
from deepseek_model.checkpoint import schema
from deepseek_model.config import ModelConfig
from deepseek_model.summary import per_rank_weight_bytes, weight_bytes

GIB = 1024 ** 3


def test_world_size_one_holds_everything():
    cfg = ModelConfig.builtin("deepseek-v3")
    one = per_rank_weight_bytes(cfg, 1)
    assert one["bf16"]["total"] == weight_bytes(cfg, "bf16") and one["fp8"]["total"] == weight_bytes(cfg, "fp8")
    assert one["valid"] == {"bf16": True, "fp8": True}


@pytest.mark.parametrize("world,fp8_gib,fp8_valid", [(8, 81.27, True), (16, 41.27, True), (32, 21.27, False)])
def test_v3_per_rank_memory(world, fp8_gib, fp8_valid):
    cfg = ModelConfig.builtin("deepseek-v3")
    r = per_rank_weight_bytes(cfg, world)
    assert r["fp8"]["total"] / GIB == pytest.approx(fp8_gib, abs=0.01)
    assert r["valid"] == {"bf16": True, "fp8": fp8_valid}
    # Routed experts dominate: 256/world whole experts per rank, about 95% of a rank's bytes.
    assert r["fp8"]["experts"] / r["fp8"]["total"] > 0.9
    # Ranks together hold the model once plus (world - 1) extra copies of the replicated part.
    total = weight_bytes(cfg, "bf16")
    assert world * r["bf16"]["total"] == pytest.approx(total + (world - 1) * r["bf16"]["replicated"], rel=1e-9)
    total = weight_bytes(cfg, "fp8")
    assert not fp8_valid or world * r["fp8"]["total"] == pytest.approx(total + (world - 1) * r["fp8"]["replicated"], rel=1e-9)


def test_v3_fp8_at_32_ranks_names_both_blocks():
    problems = per_rank_weight_bytes(ModelConfig.builtin("deepseek-v3"), 32)["problems"]["fp8"]
    assert problems == [
        "intermediate_size (dense MLP) (18432) splits into parts of 576, not a multiple of the FP8 128-block its "
        "scale is split by",
        "shared-expert width (n_shared x moe_intermediate) (2048) splits into parts of 64, not a multiple of the "
        "FP8 128-block its scale is split by"]


def test_tiny_split_problems():
    cfg = ModelConfig.builtin("tiny")
    assert schema.split_problems(cfg, 2, None) == [] and schema.split_problems(cfg, 4, None) == []
    assert schema.split_problems(cfg, 3, None)[0] == "num_attention_heads (4) is not divisible by 3"
    assert any(p.startswith("o_proj columns") for p in schema.split_problems(cfg, 2, 128))
    with pytest.raises(parallel.ParallelError, match=r"^cannot split the model over world size 8: num_attention_heads \(4\) is not divisible by 8$"):
        parallel.check_splits(cfg, 8, None)


def test_init_without_torchrun_is_single_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = parallel.init(backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.is_distributed, ctx.device) == (0, 1, False, "cpu")
    with pytest.raises(parallel.ParallelError, match="backend must be"):
        parallel.init(backend="mpi")


def test_inspect_world_size_cli(capsys):
    assert cli.main(["inspect", "deepseek-v3", "--json", "--world-size", "8", "32"]) == 0
    par = json.loads(capsys.readouterr().out)["parallel"]
    assert [p["world_size"] for p in par] == [8, 32]
    assert [p["valid"]["fp8"] for p in par] == [True, False]
    assert cli.main(["inspect", "deepseek-v3", "--world-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "world size 16 (tensor + expert parallel), weights per rank:" in text
    assert "fp8: 41.27 GiB" in text
