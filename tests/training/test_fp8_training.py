"""FP8 training emulation: 1×128 activation tiles, 128×128 weight blocks, 1×128 gradient tiles, STE."""

import pytest
import torch

from deepseek_model.fp8_training import fake_quant_act, fake_quant_weight, fp8_linear
from deepseek_model.kernels import reference
from deepseek_model.layers import Linear, LinearSpec
from deepseek_model.training import build_model

FP8_MAX = 448.0


def _act_dequant(x):
    """Independent oracle: reference.act_quant, then scale each 1×128 tile back."""
    q, s = reference.act_quant(x)
    k = x.shape[-1]
    return q.float() * s.repeat_interleave(128, dim=-1)[..., :k]


def _weight_dequant(w):
    return reference.weight_dequant(*reference.weight_quant(w))


def _on_fp8_grid(values, scale):
    """Whether values/scale lie on the e4m3 grid (up to the fp32 rounding of the scale product)."""
    r = values / scale
    return torch.allclose(r.to(torch.float8_e4m3fn).float(), r, rtol=1e-5, atol=0)


def test_forward_is_quantized_operands_times_dequantized_matmul():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 200, generator=gen) * torch.linspace(0.01, 10, 200)  # ragged K, varied ranges
    w = torch.randn(300, 200, generator=gen) / 14  # ragged N and K blocks
    y = fp8_linear(x, w)
    want = (_act_dequant(x.reshape(15, 200)) @ _weight_dequant(w).t()).reshape(3, 5, 300)
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y, x @ w.t(), rtol=1e-4, atol=1e-4)  # the rounding is really there
    torch.testing.assert_close(fake_quant_act(x), _act_dequant(x))
    torch.testing.assert_close(fake_quant_weight(w), _weight_dequant(w))


def test_backward_quantizes_the_output_gradient_per_1x128():
    gen = torch.Generator().manual_seed(1)
    m, k, n = 6, 200, 300
    x = (torch.randn(m, k, generator=gen)).requires_grad_(True)
    w = (torch.randn(n, k, generator=gen) / 14).requires_grad_(True)
    g = torch.randn(m, n, generator=gen)
    fp8_linear(x, w).backward(g)
    g_hat = _act_dequant(g)  # 1×128 tiles along the output channels
    torch.testing.assert_close(x.grad, g_hat @ _weight_dequant(w.detach()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad, g_hat.t() @ _act_dequant(x.detach()), rtol=1e-6, atol=1e-6)


def test_gradient_tiles_are_independent_1x128_blocks():
    # With one-hot input rows, dW = Ĝᵀ exactly: inspect the quantized gradient tile by tile.
    m, k, n = 4, 128, 256
    x = torch.eye(m, k)
    w = torch.zeros(n, k, requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(m, n, generator=gen)
    g[:, 128:] *= 1e4  # second tile 10^4 larger: a per-row scale would crush the first tile
    fp8_linear(x, w).backward(g)
    g_hat = w.grad[:, :m].t()  # (M, N)
    for lo in (0, 128):
        tile, ref = g_hat[:, lo:lo + 128], g[:, lo:lo + 128]
        scale = ref.abs().amax(dim=1, keepdim=True) / FP8_MAX  # one scale per row per 128 channels
        assert _on_fp8_grid(tile, scale)
        torch.testing.assert_close(tile, ref, rtol=2 ** -4, atol=0)  # e4m3: 3 mantissa bits


def test_linear_spec_switches_only_the_dense_linears(micro_cfg):
    spec = LinearSpec(fp8_training=True)
    lin, eh = Linear(200, 300, spec), Linear(200, 300, spec, fp8=False)
    with torch.no_grad():
        w = torch.randn(300, 200, generator=torch.Generator().manual_seed(3)) / 14
        lin.weight.copy_(w)
        eh.weight.copy_(w)
    x = torch.randn(2, 200)
    torch.testing.assert_close(lin(x), fp8_linear(x, w), rtol=0, atol=0)
    torch.testing.assert_close(eh(x), x @ w.t())  # layers pinned high-precision (eh_proj) opt out
    assert Linear(8, 8, LinearSpec()).fake_fp8 is False  # inference default unchanged
    model = build_model(micro_cfg, seed=0, fp8=True)
    assert model.layers[0].attn.wq_a.fake_fp8 and not model.mtp.eh_proj.fake_fp8
    assert model.layers[0].attn.wq_a.weight.dtype == torch.float32  # fp32 master weights


def test_fp8_linear_rejects_fp8_weights():
    with pytest.raises(ValueError, match="weight"):
        fp8_linear(torch.randn(2, 128), torch.zeros(128, 128, dtype=torch.float8_e4m3fn))
