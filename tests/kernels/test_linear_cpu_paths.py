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
