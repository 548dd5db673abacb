"""Triton act_quant / weight_dequant / rounding helpers vs torch, byte for byte (interpreter)."""

import pytest
import torch
import triton
import triton.language as tl

from deepseek_model.kernels import reference
from deepseek_model.kernels.fp8_quant import act_quant, weight_dequant
from deepseek_model.kernels.rounding import bf16_bits, e4m3_code, e4m3_value

FP8 = torch.float8_e4m3fn
ROUND_BLOCK = 8192  # few programs: the interpreter pays per program


@triton.jit
def _round_kernel(x_ptr, code_ptr, val_ptr, bf_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(code_ptr + offs, e4m3_code(x).to(tl.uint8), mask=mask)
    tl.store(val_ptr + offs, e4m3_value(x), mask=mask)
    tl.store(bf_ptr + offs, bf16_bits(x), mask=mask)


def _run_round(x: torch.Tensor):
    n = x.numel()
    code = torch.empty(n, dtype=torch.uint8)
    val = torch.empty(n, dtype=torch.float32)
    bf = torch.empty(n, dtype=torch.bfloat16)
    _round_kernel[(triton.cdiv(n, ROUND_BLOCK),)](x, code, val, bf.view(torch.int16), n, BLOCK=ROUND_BLOCK)
    return code, val, bf


def _hard_fp32_values() -> torch.Tensor:
    """≥1e5 fp32 values: every e4m3 value, every midpoint (ties), ±1-ulp neighbours, wide randoms."""
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    grid = grid[torch.isfinite(grid)].unique()  # 253 values incl. ±0 (unique merges ±0)
    pos = grid[grid >= 0]
    mids = (pos[1:] + pos[:-1]) / 2  # exact in fp32: RNE ties
    base = torch.cat([pos, mids, torch.tensor([448.0, 449.0, 463.99, 464.0, 465.0, 479.0, 480.0,
                                                 500.0, 1e30, float("inf"), 2.0**-10, 2.0**-9 * 1.5])])
    up = torch.nextafter(base, torch.full_like(base, float("inf")))
    down = torch.nextafter(base, torch.zeros_like(base))
    rand = torch.exp2(torch.empty(100_000).uniform_(-14, 10, generator=g)) * (1 + torch.rand(100_000, generator=g))
    mag = torch.cat([base, up, down, rand])
    sign = torch.where(torch.rand(mag.shape, generator=g) < 0.5, -1.0, 1.0)
    return torch.cat([mag, -mag, mag * sign, torch.tensor([0.0, -0.0])])


def test_rounding_helpers_match_torch_bit_for_bit():
    x = _hard_fp32_values()
    assert x.numel() >= 100_000
    code, val, bf = _run_round(x)
    ref = x.to(FP8)
    assert torch.equal(code, ref.view(torch.uint8))
    assert torch.equal(val.view(torch.int32), ref.float().view(torch.int32))  # also keeps -0.0
    assert torch.equal(bf.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_rounding_helpers_nan():
    x = torch.tensor([float("nan"), -float("nan"), 1.0])
    code, val, bf = _run_round(x)
    assert torch.equal(code, x.to(FP8).view(torch.uint8))  # 0x7F / 0xFF, as torch
    assert torch.isnan(val[:2]).all() and torch.isnan(bf[:2]).all()  # NaN payloads: not compared


def _activation_stress(rows: int, k: int) -> torch.Tensor:
    """Wide dynamic range per row, with all-zero groups, -0.0, values >= 448 and tiny values."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.empty(rows, 1).uniform_(-20, 12, generator=g))
    x[0, :] = 0.0  # all-zero row: every group hits the 1e-4 floor
    x[1, 128:256] = 0.0  # one all-zero group
    x[2, :] = -0.0
    x[3, 5] = 448.0
    x[3, 6] = 449.0
    x[3, 7] = -1e5
    x[4, :128] = torch.randn(128, generator=g) * 1e-7  # below the amax floor: subnormal fp8 outputs
    x[5, 0] = 1000.0  # one large value makes the rest of its group subnormal in fp8
    x[5, 1:128] = torch.randn(127, generator=g) * 1e-2
    return x


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_byte_exact(scale_fmt):
    x = _activation_stress(100, 1100)  # 110 000 values, K not a multiple of 128
    y, s = act_quant(x, 128, scale_fmt)
    y_ref, s_ref = reference.act_quant(x, 128, scale_fmt)
    assert y.dtype == FP8 and s.dtype == torch.float32 and s.shape == (100, 9)
    assert torch.equal(s, s_ref)
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))
    # independent formula: y == (x / s).to(fp8) with s broadcast over its 128 channels
    s_full = s.repeat_interleave(128, dim=1)[:, :1100]
    assert torch.equal(y.view(torch.uint8), (x / s_full).to(FP8).view(torch.uint8))
    assert (y.view(torch.uint8)[2] == 0x80).all()  # negative zero survives
    codes = y.view(torch.uint8)
    assert (((codes & 0x78) == 0) & ((codes & 0x07) != 0)).any()  # nonzero subnormals exercised
    if scale_fmt == "ue8m0":
        mant, _ = torch.frexp(s)
        assert (mant == 0.5).all()  # exact powers of two
        amax = torch.nn.functional.pad(x, (0, 52)).abs().reshape(100, 9, 128).amax(-1).clamp_min(1e-4)
        assert (s * 448.0 >= amax).all()


def test_act_quant_bf16_input_and_leading_dims():
    x = _activation_stress(24, 384).reshape(2, 12, 384).bfloat16()
    y, s = act_quant(x, 128)
    y_ref, s_ref = reference.act_quant(x, 128)
    assert y.shape == (2, 12, 384) and s.shape == (2, 12, 3)
    assert torch.equal(s, s_ref) and torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))


def test_act_quant_column_major_scales():
    x = torch.randn(77, 320, generator=torch.Generator().manual_seed(2))
    y, s = act_quant(x, 128, column_major_scales=True)
    y_ref, s_ref = reference.act_quant(x, 128)
    assert s.shape == (77, 3) and s.stride() == (1, 80)  # M padded to a multiple of 4
    assert torch.equal(s, s_ref) and torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))


def test_act_quant_rejects_bad_input():
    with pytest.raises(ValueError, match="x:"):
        act_quant(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_size"):
        act_quant(torch.ones(4, 128), block_size=100)
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant(torch.ones(4, 128), scale_fmt="e8m0")


@pytest.mark.parametrize("shape", [(300, 200), (576, 256), (128, 128), (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_dequant_exact_with_ragged_blocks(shape, dtype):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g) * torch.exp2(torch.empty(shape[0], 1).uniform_(-8, 8, generator=g))
    q, s = reference.weight_quant(w)
    out = weight_dequant(q, s, 128, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, reference.weight_dequant(q, s, 128, dtype))
    # independent: elementwise scale lookup by integer division of the indices
    n_idx = torch.arange(shape[0]).unsqueeze(1) // 128
    k_idx = torch.arange(shape[1]).unsqueeze(0) // 128
    assert torch.equal(out, (q.float() * s[n_idx, k_idx]).to(dtype))


def test_weight_dequant_rejects_bad_input():
    q, s = reference.weight_quant(torch.randn(300, 200))
    with pytest.raises(ValueError, match="scale shape"):
        weight_dequant(q, s[:2], 128)
    with pytest.raises(ValueError, match="w:"):
        weight_dequant(q.float(), s, 128)
    with pytest.raises(ValueError, match="dtype"):
        weight_dequant(q, s, 128, torch.int8)


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (5, 7), (129, 1)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_weight_quant_against_a_block_by_block_oracle(shape, scale_fmt):
    """Each 128×128 block on its own: scale = amax / 448 (ue8m0: the next power of two), q = fp8(w / scale),
    an all-zero block gives scale 0 and +0 codes (even from -0.0)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=g) * torch.exp2(torch.empty(shape[0], 1).uniform_(-6, 6, generator=g))
    w[:min(shape[0], 128), :min(shape[1], 128)] = -0.0  # an all-zero (negative zero) block
    q, s = reference.weight_quant(w, 128, scale_fmt)
    for i in range(0, shape[0], 128):
        for j in range(0, shape[1], 128):
            blk = w[i:i + 128, j:j + 128]
            amax = blk.abs().max()
            want_s = amax / 448.0
            if scale_fmt == "ue8m0" and want_s > 0:
                want_s = torch.exp2(torch.ceil(torch.log2(want_s)))
            assert s[i // 128, j // 128].item() == want_s.item()
            want_q = (blk / want_s).to(torch.float8_e4m3fn) if want_s > 0 else torch.zeros_like(blk).to(torch.float8_e4m3fn)
            assert torch.equal(q[i:i + 128, j:j + 128].view(torch.uint8), want_q.view(torch.uint8))


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_nan_and_inf_groups_byte_exact(scale_fmt):
    """amax leaves NaN out (the NaN keeps its own NaN code, its neighbours their codes); an inf
    makes the group's scale inf (finite values → ±0, the inf → NaN), in the kernel and its twin alike."""
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(5))
    x[0, 3] = float("nan")
    x[1, 130] = float("inf")
    x[2, 7], x[2, 150] = float("-inf"), float("nan")
    y_ref, s_ref = reference.act_quant(x, 128, scale_fmt)
    y, s = act_quant(x, 128, scale_fmt)
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8))
    assert torch.equal(s, s_ref)  # no NaN scale: inf compares equal
    clean = x.clone()
    clean[0, 3] = 0.0
    assert s[0, 0] == reference.act_quant(clean[:1], 128, scale_fmt)[1][0, 0]  # the NaN did not move the scale
    codes = y.view(torch.uint8) & 0x7F
    assert codes[0, 3] == 0x7F and int((codes[0] == 0x7F).sum()) == 1
    assert torch.isinf(s[1, 1]) and torch.isfinite(s[1, 0]) and codes[1, 130] == 0x7F
    assert torch.isinf(s[2, 0]) and codes[2, 7] == 0x7F


def test_ue8m0_keeps_inf_and_nan_scales():
    s = torch.tensor([0.0, 3.0, 4.0, 3e38, float("inf"), float("nan")])
    got = reference.round_scale_ue8m0(s)
    assert got[:3].tolist() == [0.0, 4.0, 4.0] and torch.isinf(got[3]) and torch.isinf(got[4]) and torch.isnan(got[5])
    w = torch.ones(4, 4)
    w[1, 2] = float("inf")
    q, scale = reference.weight_quant(w, 128, "ue8m0")  # an inf weight leaves a NaN code for the loader's check
    assert torch.isinf(scale[0, 0]) and (q.view(torch.uint8)[1, 2] & 0x7F) == 0x7F


def test_weight_dequant_decodes_nan_codes_as_nan():
    q = torch.full((5, 7), 0x38, dtype=torch.uint8)  # 1.0
    q[1, 2], q[3, 4] = 0x7F, 0xFF  # +NaN, -NaN
    w = q.view(torch.float8_e4m3fn)
    s = torch.full((1, 1), 2.0)
    for dtype in (torch.float32, torch.bfloat16):
        got = weight_dequant(w, s, 128, dtype)
        want = reference.weight_dequant(w, s, 128, dtype)
        assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == 2
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_twins_refuse_what_the_kernels_refuse():
    """The torch twins name a wrong dtype or block size as the Triton kernels do, instead of
    reinterpreting bytes or dividing by zero."""
    w = torch.randn(4, 8)
    s = torch.ones(1, 1)
    with pytest.raises(ValueError, match="w: expected float8_e4m3fn, got torch.float32"):
        reference.weight_dequant(w, s)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        reference.act_quant(w, 0)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got -128"):
        reference.weight_quant(w, -128)
    with pytest.raises(ValueError, match="x: expected a float tensor"):
        reference.act_quant(torch.tensor(3.0).to(torch.int32))
    q = w.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="a: expected float8_e4m3fn"):
        reference.fp8_gemm(w, torch.ones(4, 1), q, s)


def test_a_nan_block_scale_does_not_overflow_the_others():
    w = torch.full((256, 8), 1.0).to(torch.float8_e4m3fn)
    s = torch.tensor([[1e30], [float("nan")]])
    out = reference.weight_dequant(w, s, 128)
    assert out[0, 0].item() == pytest.approx(1e30, rel=1e-6) and torch.isnan(out[128:]).all()
    got = weight_dequant(w, s, 128)  # the kernel under the interpreter
    assert torch.equal(got[:128], out[:128]) and torch.isnan(got[128:]).all()
