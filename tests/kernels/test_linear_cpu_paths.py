"""ops.linear on CPU: the W·Xᵀ path for a few rows gives x·Wᵀ (float64 reference) for every row count."""

import pytest
import torch

from deepseek_model.kernels import ops


@pytest.mark.parametrize("shape", [(80, 256), (768, 256), (4096, 64)])  # below and above NARROW_MIN_WEIGHT
@pytest.mark.parametrize("rows", [1, 2, 3, ops.CPU_NARROW_ROWS, ops.CPU_NARROW_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_rows_match_float64(shape, rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(shape, generator=gen).to(dtype)
    x = torch.randn(1, rows, shape[1], generator=gen).to(dtype)  # (B, T, K)
    bias = torch.randn(shape[0], generator=gen).to(dtype)
    y = ops.linear(x, w, bias=bias)
    ref = (x.double() @ w.double().T + bias.double())  # (B, T, N)
    assert y.shape == (1, rows, shape[0]) and y.dtype == dtype and y.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol * shape[1] ** 0.5)


def test_zero_rows():
    w = torch.randn(8, 4)
    assert ops.linear(torch.zeros(0, 4), w).shape == (0, 8)


@pytest.mark.parametrize("scale_max", [1e-3, 2.0 ** 7 - 1, 2.0 ** 7, 1e6])
def test_weight_dequant_is_the_fp32_product_for_every_byte_and_scale(scale_max):
    """The bit-placement decode equals torch's fp8 cast times the scale (rounded once), ragged blocks,
    subnormals and NaN codes included, up to scales where scale·2^120 would overflow (torch's path)."""
    from deepseek_model.kernels import reference

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    w = codes.repeat(77 * 3)[: 150 * 300 // 2].reshape(75, 300)  # ragged rows and columns
    gen = torch.Generator().manual_seed(0)
    s = torch.rand(1, 3, generator=gen) * scale_max  # (ceil(75/128), ceil(300/128))
    s[0, 1] = 0.0  # an all-zero block's scale
    want = w.float() * s.repeat_interleave(128, 0)[:75].repeat_interleave(128, 1)[:, :300]
    got = reference.weight_dequant(w, s, 128, torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, NaNs included
    assert reference.weight_dequant(w[:0], s[:0], 128).shape == (0, 300)
