"""bf16-to-fp8: exactly the published FP8 tensor set, byte-exact per-block formula, ue8m0, round trip."""

from __future__ import annotations

import math
import os

import pytest
import torch
from convert_helpers import read_json, run_cli

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.convert.fp8 import bf16_to_fp8, fp8_to_bf16
from deepseek_model.convert.verify import verify
from deepseek_model.kernels.reference import weight_dequant

B = 128
E4M3_MAX = 448.0


def independent_block_quant(w: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block, in float64 where exact: scale = amax/448 (ue8m0: 2^ceil(log2)), q = fp8(w/scale);
    ue8m0 then stores a block whose codes peak at 224 as doubled codes at half the scale (same values,
    and a bf16 round trip re-quantizes it to the same bytes)."""
    n, k = w.shape
    q = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    s = torch.zeros(math.ceil(n / B), math.ceil(k / B), dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * B:(i + 1) * B, j * B:(j + 1) * B].float()  # ragged edges: only the real elements
            scale = torch.tensor(float(blk.abs().max()) / E4M3_MAX, dtype=torch.float32)  # amax/448 rounded once
            if ue8m0 and scale > 0:
                scale = torch.tensor(2.0 ** math.ceil(math.log2(float(scale))), dtype=torch.float32)
            codes = (blk / scale).to(torch.float8_e4m3fn) if scale > 0 else torch.zeros_like(blk).to(torch.float8_e4m3fn)
            if ue8m0 and float(codes.float().abs().max()) == E4M3_MAX / 2:
                codes, scale = (codes.double() * 2).to(torch.float8_e4m3fn), scale / 2
            s[i, j] = scale
            q[i * B:(i + 1) * B, j * B:(j + 1) * B] = codes
    return q, s


@pytest.fixture(scope="module")
def quantized(tiny_bf16, tmp_path_factory) -> str:
    dst = tmp_path_factory.mktemp("q") / "fp8"
    proc = run_cli("bf16-to-fp8", tiny_bf16, dst, "-q")
    assert proc.returncode == 0, proc.stderr
    return str(dst)


def test_published_tensor_set_and_config(tiny_fp8, quantized):
    out = CheckpointReader(quantized)
    assert set(out.names()) == set(CheckpointReader(tiny_fp8).names())  # same inventory as a published FP8 dir
    for name in out.names():
        if schema.is_fp8_weight(name):
            assert out.dtype(name) == torch.float8_e4m3fn and out.dtype(schema.scale_name(name)) == torch.float32
            assert out.file_of(schema.scale_name(name)) == out.file_of(name)
        elif not schema.is_scale_name(name):
            assert out.dtype(name) != torch.float8_e4m3fn
    qc = read_json(os.path.join(quantized, "config.json"))["quantization_config"]
    assert qc == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@pytest.mark.parametrize("ue8m0", [False, True])
def test_byte_exact_vs_independent_per_block_formula(tiny_bf16, quantized, tmp_path, ue8m0):
    if ue8m0:
        bf16_to_fp8(tiny_bf16, tmp_path / "ue8m0", scale_fmt="ue8m0", quiet=True)
        quantized = tmp_path / "ue8m0"
        assert read_json(quantized / "config.json")["quantization_config"]["scale_fmt"] == "ue8m0"
    src, out = CheckpointReader(tiny_bf16), CheckpointReader(quantized)
    checked = ragged = 0
    for name in src.names():
        if not schema.is_fp8_weight(name):
            assert torch.equal(out.get(name), src.get(name)), name  # copied unchanged
            continue
        q_ref, s_ref = independent_block_quant(src.get(name), ue8m0)
        s = out.get(schema.scale_name(name))
        assert torch.equal(out.get(name).view(torch.uint8), q_ref.view(torch.uint8)), name
        assert torch.equal(s, s_ref), name
        if ue8m0:
            mant, _ = torch.frexp(s)
            assert bool(((mant == 0.5) | (s == 0)).all()), name  # powers of two
        checked += 1
        ragged += any(d % B for d in src.shape(name))
    assert checked > 100 and ragged > 10  # kv_a (160 rows), q_b (192 cols), experts (96) are ragged


def test_roundtrip_fp8_bf16_fp8_within_block_bound(tiny_fp8, tmp_path):
    fp8_to_bf16(tiny_fp8, tmp_path / "bf16", quiet=True)
    bf16_to_fp8(tmp_path / "bf16", tmp_path / "fp8", quiet=True)
    a, b = CheckpointReader(tiny_fp8), CheckpointReader(tmp_path / "fp8")
    for name in a.names():
        if a.dtype(name) != torch.float8_e4m3fn:
            continue
        sa = a.get(schema.scale_name(name))
        da = weight_dequant(a.get(name), sa)
        db = weight_dequant(b.get(name), b.get(schema.scale_name(name)))
        bound = 16.0 * sa.repeat_interleave(B, 0)[: da.shape[0]].repeat_interleave(B, 1)[:, : da.shape[1]]
        assert bool(((da - db).abs() <= bound).all()), name  # half an e4m3 step at the top binade, per block
    report = verify(tiny_fp8, tmp_path / "fp8")
    s = report["summary"]
    assert s["ok"] and s["fp8_blocks"] > 0 and s["fp8_blocks_over_bound"] == 0
    assert 0 < s["max_rel_err"] < 1e-2


def test_banded_quantization_equals_the_whole_tensors_on_edge_blocks():
    """The converter quantizes bands of rows that start a block row: each band's codes and scales
    are the whole tensor's rows, with all-zero blocks (also of -0.0), tiny and huge magnitudes,
    aligned and ragged shapes."""
    from deepseek_model.kernels.reference import weight_quant

    g = torch.Generator().manual_seed(0)
    for rows, k in ((256, 384), (130, 300)):
        w = (torch.randn(rows, k, generator=g) * torch.logspace(-8, 4, k)).to(torch.bfloat16)
        w[:128, :128] = -0.0
        w[128:, 128:256] = 0.0
        for fmt in (None, "ue8m0"):
            whole_q, whole_s = weight_quant(w, scale_fmt=fmt)
            for start, stop in ((0, 128), (128, rows)):
                q, s = weight_quant(w[start:stop], scale_fmt=fmt)
                assert torch.equal(q.view(torch.uint8), whole_q[start:stop].view(torch.uint8))
                assert torch.equal(s, whole_s[start // 128:-(-stop // 128)])
