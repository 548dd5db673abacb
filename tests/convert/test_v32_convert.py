"""DeepSeek-V3.2 checkpoints through the converters: exact fp8⇄bf16 round trip (ue8m0 scales, as
V3.2 ships), the indexer's tensors replicated by shard/merge, and missing indexer tensors refused."""

from __future__ import annotations

import os

import pytest
import torch
from convert_helpers import run_cli, tree_checksums

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.checkpoint.sharded import load_rank
from deepseek_model.checkpoint.writer import write_checkpoint
from deepseek_model.convert.fp8 import bf16_to_fp8, fp8_to_bf16
from deepseek_model.convert.io import ConvertError
from deepseek_model.convert.shard import merge

INDEXER = "model.layers.1.self_attn.indexer."


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_fp8_bf16_fp8_round_trip_is_bit_exact(tiny_v32, tmp_path):
    src = CheckpointReader(tiny_v32)
    assert src.config()["quantization_config"]["scale_fmt"] == "ue8m0"
    assert src.dtype(INDEXER + "wq_b.weight") == torch.float8_e4m3fn and INDEXER + "wk.weight_scale_inv" in src
    fp8_to_bf16(tiny_v32, str(tmp_path / "bf16"), quiet=True)
    mid = CheckpointReader(tmp_path / "bf16")
    assert mid.dtype(INDEXER + "wk.weight") == torch.bfloat16 and INDEXER + "wk.weight_scale_inv" not in mid
    bf16_to_fp8(str(tmp_path / "bf16"), str(tmp_path / "fp8"), scale_fmt="ue8m0", quiet=True)
    back = CheckpointReader(tmp_path / "fp8")
    assert sorted(back.names()) == sorted(src.names())
    for name in src.names():
        assert _same_bytes(src.get(name), back.get(name)), name


def test_shard_replicates_the_indexer_and_merge_is_exact(tiny_v32, tmp_path):
    for part in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
        assert schema.split_rule(INDEXER + part)[0] == schema.SPLIT_REPLICATED
    bf16 = str(tmp_path / "bf16")  # tiny's 384-wide MLP splits into 192-wide parts: bf16 only
    fp8_to_bf16(tiny_v32, bf16, quiet=True)
    proc = run_cli("shard", bf16, tmp_path / "tp2", "--model-parallel", "2", "-q")
    assert proc.returncode == 0, proc.stderr
    src = CheckpointReader(bf16)
    for rank in range(2):
        tensors = load_rank(str(tmp_path / "tp2"), rank)
        for name in (INDEXER + "wq_b.weight", INDEXER + "wk.weight", INDEXER + "weights_proj.weight",
                     INDEXER + "k_norm.bias"):
            assert _same_bytes(tensors[name], src.get(name)), (rank, name)
    merge(str(tmp_path / "tp2"), str(tmp_path / "merged"), quiet=True)
    merged = CheckpointReader(tmp_path / "merged")
    for name in src.names():
        assert _same_bytes(src.get(name), merged.get(name)), name


@pytest.fixture(scope="module")
def without_wk(tiny_v32, tmp_path_factory) -> str:
    """The V3.2 checkpoint with one layer's indexer wk (and its scale) missing."""
    reader = CheckpointReader(tiny_v32)
    tensors = {n: reader.get(n) for n in reader.names() if not n.startswith(INDEXER + "wk.")}
    return write_checkpoint(str(tmp_path_factory.mktemp("v32") / "no-wk"), tensors, reader.config())


@pytest.mark.parametrize("command", ["fp8-to-bf16", "shard"])
def test_converters_refuse_a_v32_checkpoint_without_its_indexer_tensors(without_wk, tmp_path, command):
    before = tree_checksums(without_wk)
    args = ["--model-parallel", "2"] if command == "shard" else []
    proc = run_cli(command, without_wk, tmp_path / "out", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert INDEXER + "wk.weight" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out") and tree_checksums(without_wk) == before


def test_bf16_to_fp8_refuses_a_v32_checkpoint_without_its_indexer_tensors(tiny_v32, tmp_path):
    fp8_to_bf16(tiny_v32, str(tmp_path / "bf16"), quiet=True)
    reader = CheckpointReader(tmp_path / "bf16")
    tensors = {n: reader.get(n) for n in reader.names() if n != INDEXER + "k_norm.bias"}
    src = write_checkpoint(str(tmp_path / "no-bias"), tensors, reader.config())
    with pytest.raises(ConvertError, match=r"model\.layers\.1\.self_attn\.indexer\.k_norm\.bias"):
        bf16_to_fp8(src, str(tmp_path / "fp8"), quiet=True)
    assert not os.path.exists(tmp_path / "fp8")
