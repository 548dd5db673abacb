"""The converter benchmark's synthetic checkpoint is a valid FP8 checkpoint the converter accepts."""

from __future__ import annotations

import pytest
import torch

from deepseek_model.benchmarks.bench_convert import _fp8_bytes, synthetic_config, write_synthetic_fp8
from deepseek_model.config import builtin_config_dict
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.convert.fp8 import fp8_to_bf16


def test_synthetic_config_scales_layers_not_tensors():
    small, large = synthetic_config(0.5), synthetic_config(2.0)
    assert large["num_hidden_layers"] > small["num_hidden_layers"]
    assert large["hidden_size"] == small["hidden_size"] and large["vocab_size"] == small["vocab_size"]
    assert 1.5e9 < _fp8_bytes(large) < 2.5e9


def test_synthetic_checkpoint_converts(tmp_path):
    info = write_synthetic_fp8(str(tmp_path / "synth"), builtin_config_dict("tiny"))
    reader = CheckpointReader(tmp_path / "synth")
    assert sum(reader.nbytes(n) for n in reader.names()) == info["bytes"]
    fp8_to_bf16(tmp_path / "synth", tmp_path / "bf16", quiet=True)
    out = CheckpointReader(tmp_path / "bf16")
    assert all(torch.isfinite(out.get(n).float()).all() for n in out.names())


@pytest.mark.parametrize("args, needle", [
    (["--size-gb", "-1"], "--size-gb: expected a positive size, got -1.0"),
    (["--size-gb", "nan"], "--size-gb: expected a positive size, got nan"),
    (["--size-gb", "1e9"], "GB of disk in"),  # refused before writing anything
    (["--path", "/no/such/ckpt"], "--path /no/such/ckpt: not a checkpoint directory"),
    (["--tmpdir", "/no/such/dir"], "--tmpdir /no/such/dir: not a directory"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, args, needle):
    from deepseek_model.benchmarks import bench_convert

    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        bench_convert.main([*args, *([] if "--tmpdir" in args else ["--tmpdir", str(tmp_path)])])
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("deepseek-model bench convert: error: ") and needle in line
    assert set(tmp_path.iterdir()) == before  # no work directory was made
