"""from_pretrained: FP8 handling (ragged blocks exact, W8A8 path) and a one-line error per bad input."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

import deepseek_model as dsm
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.kernels import reference

INDEX = "model.safetensors.index.json"
KV_A = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"


def test_ragged_block_dequant_is_exact(tiny_fp8):
    model = dsm.from_pretrained(tiny_fp8, dtype=torch.float32, weights="bf16")
    with CheckpointReader(tiny_fp8) as r:
        w, s = r.get(KV_A), r.get(KV_A + "_scale_inv")
        assert r.file_of(KV_A) in r.files
    assert w.shape == (160, 256) and s.shape == (2, 2)  # 160 rows: one full and one ragged 32-row block
    want = torch.empty(160, 256)
    for i in range(2):
        for j in range(2):
            rows, cols = slice(128 * i, min(160, 128 * (i + 1))), slice(128 * j, 128 * (j + 1))
            want[rows, cols] = w[rows, cols].float() * s[i, j]
    assert torch.equal(model.layers[1].attn.wkv_a.weight.data, want)


def test_scales_in_other_shards_are_found(tiny_fp8):
    with CheckpointReader(tiny_fp8) as r:
        split = [n for n in r.names() if n.endswith("_scale_inv") and r.file_of(n) != r.file_of(n[:-10])]
    assert split, "the generator must put some scales in another shard than their weight"
    dsm.from_pretrained(tiny_fp8, weights="bf16")


def test_fp8_weights_run_w8a8(tiny_fp8):
    m8 = dsm.from_pretrained(tiny_fp8, dtype=torch.float32, weights="w8a8")
    md = dsm.from_pretrained(tiny_fp8, dtype=torch.float32, weights="bf16")
    lin = m8.layers[1].attn.wkv_a
    assert lin.weight.dtype == torch.float8_e4m3fn and lin.scale.shape == (2, 2)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    a, a_s = reference.act_quant(x)
    x_q = (a.float().view(3, 2, 128) * a_s.unsqueeze(-1)).view(3, 256)  # activation fp8 round trip
    torch.testing.assert_close(lin(x), x_q @ md.layers[1].attn.wkv_a.weight.T, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y8, yd = m8(ids), md(ids)
    rel = ((y8 - yd).norm() / yd.norm()).item()
    assert 1e-3 < rel < 0.3  # activations really are quantized, and it is the same model (0.16 measured)
    agree = (y8.argmax(-1) == yd.argmax(-1)).float().mean().item()
    print(f"W8A8 vs dequantized weights: max |logit diff| {(y8 - yd).abs().max().item():.3g} "
          f"(scale {yd.abs().max().item():.3g}), greedy agreement {agree:.0%}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_fp8_keeps_fp8_and_computes_like_dequantized_weights(tiny_fp8, dtype):
    """weights="fp8" (and "auto" on a CPU): FP8 in memory, each GEMM on the dequantized weight."""
    wo = dsm.from_pretrained(tiny_fp8, dtype=dtype, weights="fp8")
    auto = dsm.from_pretrained(tiny_fp8, dtype=dtype)
    dense = dsm.from_pretrained(tiny_fp8, dtype=dtype, weights="bf16")
    for m in (wo, auto):
        lin = m.layers[1].ffn.experts[3].w2
        assert lin.weight.dtype == torch.float8_e4m3fn and not lin.spec.w8a8
    fp8_bytes = sum(p.numel() * p.element_size() for p in wo.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in dense.parameters())
    assert fp8_bytes < 0.6 * dense_bytes
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, c = wo(ids), auto(ids), dense(ids)
    assert torch.equal(a, b)
    tol = 1e-5 if dtype == torch.float32 else 0.05  # the same products, rounded the same way
    torch.testing.assert_close(a, c, rtol=tol, atol=tol)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0), dtype=dtype)
    lin_wo, lin_d = wo.layers[1].attn.wkv_a, dense.layers[1].attn.wkv_a
    assert torch.equal(lin_wo(x), lin_d(x))  # one GEMM: bit-identical


def test_dense_checkpoint_quantized_at_load(tiny_bf16):
    m = dsm.from_pretrained(tiny_bf16, weights="fp8")
    with CheckpointReader(tiny_bf16) as r:
        w = r.get(KV_A).float()
    lin = m.layers[1].attn.wkv_a
    assert lin.weight.dtype == torch.float8_e4m3fn
    assert lin.scale[0, 0].item() == (w[:128, :128].abs().max() / 448.0).item()  # fp32 amax/448


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def broken(tiny_fp8, tmp_path):
    """A fresh copy of the tiny fp8 checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_fp8, dst)
    return dst


def _index(path):
    return json.loads((path / INDEX).read_text())


def _write_index(path, index):
    (path / INDEX).write_text(json.dumps(index))


def _add_shard(path, tensors, name="model-extra.safetensors"):
    save_file(tensors, str(path / name))
    index = _index(path)
    index["weight_map"].update({k: name for k in tensors})
    _write_index(path, index)


def _error(path, **kw):
    with pytest.raises(dsm.CheckpointError) as e:
        dsm.from_pretrained(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor(broken):
    index = _index(broken)
    del index["weight_map"]["model.layers.2.mlp.experts.3.up_proj.weight"]
    del index["weight_map"]["model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"]
    _write_index(broken, index)
    assert "missing tensor 'model.layers.2.mlp.experts.3.up_proj.weight'" in _error(broken)


def test_unexpected_tensor(broken):
    _add_shard(broken, {"model.layers.0.self_attn.rotary.weight": torch.zeros(2)})
    msg = _error(broken)
    assert "unexpected tensor 'model.layers.0.self_attn.rotary.weight'" in msg and "model-extra.safetensors" in msg


def test_misshaped_tensor(broken):
    _add_shard(broken, {"model.norm.weight": torch.zeros(255, dtype=torch.bfloat16)})
    assert "'model.norm.weight' has shape [255], the config needs [256]" in _error(broken)


def test_missing_scale(broken):
    index = _index(broken)
    del index["weight_map"][KV_A + "_scale_inv"]
    _write_index(broken, index)
    assert f"fp8 tensor '{KV_A}' has no scale '{KV_A}_scale_inv'" in _error(broken)


def test_wrong_scale_grid(broken):
    _add_shard(broken, {KV_A + "_scale_inv": torch.ones(1, 2)})
    assert f"scale '{KV_A}_scale_inv' has shape [1, 2]" in _error(broken)


def test_index_naming_file_outside(broken):
    index = _index(broken)
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    _write_index(broken, index)
    assert "outside the checkpoint directory" in _error(broken)


def test_missing_shard_and_index(broken):
    os.remove(broken / "model-00002-of-000004.safetensors")
    assert "model-00002-of-000004.safetensors: shard missing" in _error(broken)
    os.remove(broken / INDEX)
    assert "model.safetensors.index.json: missing" in _error(broken)


def test_truncated_shard(broken):
    shard = broken / "model-00003-of-000004.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    msg = _error(broken)
    assert "model-00003-of-000004.safetensors: truncated" in msg


def test_corrupt_shard_header(broken):
    shard = broken / "model-00001-of-000004.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32
    shard.write_bytes(bytes(data))
    assert "model-00001-of-000004.safetensors: corrupt safetensors header" in _error(broken)


def test_bad_arguments(tiny_bf16):
    with pytest.raises(ValueError, match="weights must be one of"):
        dsm.from_pretrained(tiny_bf16, weights="int4")
    with pytest.raises(ValueError, match="attn must be one of"):
        dsm.from_pretrained(tiny_bf16, attn="flash")
    with pytest.raises(dsm.CheckpointError, match="not a checkpoint directory"):
        dsm.from_pretrained(os.path.join(tiny_bf16, "nope"))
    for kwargs, needle in [
        (dict(backend="bogus"), "backend must be one of ('auto', 'torch', 'triton'), got 'bogus'"),
        (dict(max_seq_len=-5), "max_seq_len must be a positive integer or None, got -5"),
        (dict(max_seq_len=0), "max_seq_len must be a positive integer or None, got 0"),  # not the default
        (dict(max_seq_len=2.5), "max_seq_len must be a positive integer or None, got 2.5"),
        (dict(dtype=torch.int8), "dtype must be torch.float32, torch.bfloat16 or torch.float16"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(device="bogus"), "device 'bogus' is not a torch device"),
    ]:
        with pytest.raises(ValueError) as e:
            dsm.from_pretrained(tiny_bf16, **kwargs)
        assert needle in str(e.value) and "\n" not in str(e.value), (kwargs, str(e.value))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            dsm.from_pretrained(tiny_bf16, device="cuda")
    assert dsm.from_pretrained(tiny_bf16, max_seq_len=64).max_seq_len == 64


def test_deduplicated_mtp_copies_share_the_main_tensors(tiny_fp8, tmp_path):
    from deepseek_model.convert.fp8 import fp8_to_bf16

    dst = str(tmp_path / "dedup")
    fp8_to_bf16(tiny_fp8, dst, dedupe_mtp=True, quiet=True)
    with CheckpointReader(dst) as r:
        assert "model.layers.3.embed_tokens.weight" not in r and "model.layers.3.eh_proj.weight" in r
    model = dsm.from_pretrained(dst)
    assert model.mtp.embed.weight is model.embed.weight and model.mtp.head.weight is model.head.weight
    full = dsm.from_pretrained(tiny_fp8, weights="bf16", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.to(torch.float32).mtp_logits(ids), full.float().mtp_logits(ids))


# ---------------------------------------------------------------------- hostile values
NORM = "model.norm.weight"


def _replace(path, name, tensor):
    _add_shard(path, {name: tensor.contiguous()}, name="model-replaced.safetensors")


def test_nan_or_inf_weights_refused_unless_asked(broken):
    with CheckpointReader(broken) as r:
        w = r.get(NORM).clone()
    w[3], w[7] = float("nan"), float("inf")
    _replace(broken, NORM, w)
    msg = _error(broken, weights="bf16")
    assert f"tensor '{NORM}' holds 2 NaN or infinite values" in msg and "model-replaced.safetensors" in msg
    m = dsm.from_pretrained(broken, weights="bf16", check_values=False)  # the explicit opt-out
    assert torch.isnan(m.norm.weight[3])
    with pytest.raises(ValueError, match="non-finite logits"):  # and generation refuses to make up tokens
        dsm.generate(m, [[1, 2, 3]], max_new_tokens=2)


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_fp8_nan_codes_refused(broken, weights):
    with CheckpointReader(broken) as r:
        w = r.get(KV_A).clone()
    w.view(torch.uint8)[5, 9] = 0xFF  # -NaN in e4m3fn
    _replace(broken, KV_A, w)
    assert f"tensor '{KV_A}' holds 1 NaN or infinite values" in _error(broken, weights=weights)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_bad_block_scales_refused(broken, bad):
    with CheckpointReader(broken) as r:
        s = r.get(KV_A + "_scale_inv").clone()
    s[1, 0] = bad
    _replace(broken, KV_A + "_scale_inv", s)
    assert f"scale '{KV_A}_scale_inv' holds NaN, infinite or negative values" in _error(broken)


def test_zero_block_scale_is_an_all_zero_block(broken):
    with CheckpointReader(broken) as r:
        s = r.get(KV_A + "_scale_inv").clone()
    s[0, 1] = 0.0  # what the quantizer writes for an all-zero block
    _replace(broken, KV_A + "_scale_inv", s)
    m = dsm.from_pretrained(broken, weights="bf16", dtype=torch.float32)
    assert torch.count_nonzero(m.layers[1].attn.wkv_a.weight[:128, 128:]) == 0


def test_integer_weights_refused(broken):
    _replace(broken, NORM, torch.ones(256, dtype=torch.int32))
    assert f"tensor '{NORM}' is int32; weights must be floating point" in _error(broken)
