"""fp8-to-bf16: exact block dequantization, HF layout, config rewrite, other files, transformers load."""

from __future__ import annotations

import os

import pytest
import torch

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.convert.fp8 import dequant_band, fp8_to_bf16
from deepseek_model.kernels.reference import weight_dequant, weight_quant

from convert_helpers import EXTRA_FILES, read_json, run_cli, tree_checksums


@pytest.fixture(scope="module")
def converted(tiny_fp8, tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("out") / "bf16"
    before = tree_checksums(tiny_fp8)
    proc = run_cli("fp8-to-bf16", tiny_fp8, dst, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert tree_checksums(tiny_fp8) == before
    return str(dst)


def test_dequant_band_matches_weight_dequant_on_ragged_shapes():
    gen = torch.Generator().manual_seed(0)
    for n, k in [(160, 256), (576, 300), (1, 129), (128, 128), (300, 77)]:
        q, s = weight_quant(torch.randn(n, k, generator=gen))
        assert torch.equal(dequant_band(q, s).view(torch.int16), weight_dequant(q, s, dtype=torch.bfloat16).view(torch.int16))


def test_tensors_equal_weight_dequant_of_source(tiny_fp8, converted):
    src, dst = CheckpointReader(tiny_fp8), CheckpointReader(converted)
    expected = {n for n in src.names() if not schema.is_scale_name(n)}
    assert set(dst.names()) == expected
    n_fp8 = 0
    for name in dst.names():
        out = dst.get(name)
        if src.dtype(name) == torch.float8_e4m3fn:
            n_fp8 += 1
            ref = weight_dequant(src.get(name), src.get(schema.scale_name(name)), dtype=torch.bfloat16)
            assert out.dtype == torch.bfloat16
            assert torch.equal(out.view(torch.int16), ref.view(torch.int16)), name
        else:
            ref = src.get(name)
            assert out.dtype == ref.dtype and torch.equal(out, ref), name
    assert n_fp8 > 100
    assert dst.shape("model.layers.0.self_attn.kv_a_proj_with_mqa.weight") == (160, 256)  # ragged rows kept


def test_layout_index_config_and_other_files(tiny_fp8, converted):
    src_index = read_json(os.path.join(tiny_fp8, "model.safetensors.index.json"))
    index = read_json(os.path.join(converted, "model.safetensors.index.json"))
    for name, fname in index["weight_map"].items():
        assert src_index["weight_map"][name] == fname  # same shard names and split
    sizes = CheckpointReader(converted)
    assert index["metadata"]["total_size"] == sum(sizes.nbytes(n) for n in sizes.names())
    config = read_json(os.path.join(converted, "config.json"))
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    assert config["num_nextn_predict_layers"] == 1
    for name, text in EXTRA_FILES.items():
        with open(os.path.join(converted, name), encoding="utf-8") as f:
            assert f.read() == text
    assert os.path.exists(os.path.join(converted, "generation_config.json"))
    mtp = f"model.layers.{config['num_hidden_layers']}."
    assert any(n.startswith(mtp) for n in index["weight_map"])  # MTP kept by default


def test_strip_mtp_option(tiny_fp8, tmp_path):
    fp8_to_bf16(tiny_fp8, tmp_path / "out", strip_mtp=True, quiet=True)
    config = read_json(tmp_path / "out" / "config.json")
    assert config["num_nextn_predict_layers"] == 0
    layer = config["num_hidden_layers"]
    assert all(schema.layer_index(n) in (None, *range(layer)) for n in CheckpointReader(tmp_path / "out").names())


def test_transformers_loads_output(converted):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(converted, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 7, model.config.vocab_size)
    import deepseek_model as dsm

    ours = dsm.from_pretrained(converted, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(ours(ids).float(), logits, atol=1e-4, rtol=0)


def test_dequant_band_bit_exact_on_every_byte():
    """The bit-placement decode equals torch's fp8 cast times the scale for all 256 codes
    (subnormals, ±0, ±448, NaN), with scales of very different magnitudes and a ragged band."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    q = codes.repeat(130 * 2)[: 130 * 300].view(130, 300)  # 130 rows (ragged), K=300 (ragged)
    s = torch.tensor([[1e-6, 3.0, 0.5], [2.0 ** -30, 250.0, 1.0]])
    for dtype in (torch.bfloat16, torch.float32):
        want = weight_dequant(q, s, dtype=dtype)
        got = dequant_band(q, s, dtype=dtype)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))
    finite = q.view(torch.uint8).bitwise_and(0x7F) != 0x7F
    q_finite = torch.where(finite, q.view(torch.uint8), 0).view(torch.float8_e4m3fn)
    assert torch.equal(dequant_band(q_finite, s).view(torch.int16),
                       weight_dequant(q_finite, s, dtype=torch.bfloat16).view(torch.int16))
