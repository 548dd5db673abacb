"""kernels/ops.py dispatch: backend resolution and triton == torch through the public ops."""

import pytest
import torch

from deepseek_model.kernels import ops, reference


def test_auto_on_cpu_resolves_to_torch():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("auto") == "torch"
    assert ops.resolve_backend("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("cuda")


def test_ops_backends_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 320, generator=g)
    for fmt in (None, "ue8m0"):
        yt, st = ops.act_quant(x, 128, fmt, backend="triton")
        yr, sr = ops.act_quant(x, 128, fmt, backend="auto")
        assert torch.equal(yt.view(torch.uint8), yr.view(torch.uint8)) and torch.equal(st, sr)
    q, s = ops.weight_quant(torch.randn(200, 320, generator=g))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(ops.weight_dequant(q, s, 128, dtype, backend="triton"),
                           ops.weight_dequant(q, s, 128, dtype, backend="torch"))
    a, a_s = reference.act_quant(x.reshape(15, 320))
    ct = ops.fp8_gemm(a, a_s, q, s, torch.float32, backend="triton")
    cr = ops.fp8_gemm(a, a_s, q, s, torch.float32, backend="torch")
    assert (ct - cr).abs().max() <= 1e-6 * cr.abs().max()


def test_column_major_scales_twin_and_dispatch():
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(1))
    yt, st = ops.act_quant(x, backend="triton", column_major_scales=True)
    yr, sr = ops.act_quant(x, backend="torch", column_major_scales=True)
    assert st.stride() == sr.stride() == (1, 8)
    assert torch.equal(st, sr) and torch.equal(yt.view(torch.uint8), yr.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_fp8_weight_triton_vs_torch(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 256, generator=g).to(dtype)
    q, s = ops.weight_quant(torch.randn(576, 256, generator=g) * 0.02)
    bias = torch.randn(576, generator=g)
    yt = ops.linear(x, q, s, bias, backend="triton")
    yr = ops.linear(x, q, s, bias, backend="torch")
    assert yt.shape == (2, 3, 576) and yt.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (yt.float() - yr.float()).abs().max() <= tol * yr.float().abs().max()


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs TRITON_INTERPRET=1"):
        ops.act_quant(torch.randn(2, 128), backend="triton")
    assert ops.resolve_backend("auto", "cpu") == "torch"


def test_linear_arguments_are_checked_on_every_path():
    x, w = torch.randn(3, 256), torch.randn(4, 256)
    q = w.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="linear: an fp8 weight needs its block scale"):
        ops.linear(x, q, None, w8a8=False, row_tile=2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"linear: row_tile must be a positive integer or None, got {bad}"):
            ops.linear(x, w, row_tile=bad)
    with pytest.raises(ValueError, match="linear: x must be a float tensor, got torch.int32"):
        ops.linear(x.to(torch.int32), w)
