"""all_finite / nonfinite_mask agree with torch.isfinite on every dtype a checkpoint holds."""

import pytest
import torch

from deepseek_model.checkpoint.values import all_finite, nonfinite_mask
from deepseek_model.constants import FP8_DTYPE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 129, generator=g).to(dtype)
    assert all_finite(base) and all_finite(base[:0]) and all_finite(base[:, ::2])  # views and empty
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0), (36, 128), (17, 64)):
            t = base.clone()
            t[where] = bad
            assert not all_finite(t), (dtype, bad, where)
            assert not all_finite(t.T)  # a transposed view
            assert int(nonfinite_mask(t).sum()) == 1
    big = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)
    assert all_finite(big) and all_finite(-big)  # the largest finite values are finite


def test_fp8_nan_codes():
    t = torch.randn(64, 128).clamp(-400, 400).to(FP8_DTYPE)
    assert all_finite(t)
    for code in (0x7F, 0xFF):  # +NaN and -NaN; e4m3fn has no infinities
        bad = t.clone()
        bad.view(torch.uint8)[3, 5] = code
        assert not all_finite(bad) and int(nonfinite_mask(bad).sum()) == 1
    top = torch.tensor([448.0, -448.0]).to(FP8_DTYPE)  # S.1111.110: the largest finite code
    assert all_finite(top)


def test_dtypes_without_a_min_max_kernel_and_integers():
    e5m2 = torch.randn(8, 16).to(torch.float8_e5m2)  # has infinities, and no aminmax on the CPU
    assert all_finite(e5m2)
    e5m2[2, 3] = float("inf")
    assert not all_finite(e5m2) and int(nonfinite_mask(e5m2).sum()) == 1
    ints = torch.arange(12).view(3, 4)
    assert all_finite(ints) and not nonfinite_mask(ints).any()
