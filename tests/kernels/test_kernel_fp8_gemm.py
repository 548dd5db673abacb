"""Triton fp8_gemm vs fp64 math and the torch twin: tails, ragged K, bf16 rounding, split-K."""

import json

import pytest
import torch

from deepseek_model.kernels import reference
from deepseek_model.kernels.fp8_gemm import fp8_gemm
from deepseek_model.kernels.fp8_quant import act_quant
from deepseek_model.kernels.tiles import TILES_FILE, TileConfig, all_tiles, check_tile, get_tile

FP8 = torch.float8_e4m3fn
BIG_TILE = TileConfig(BLOCK_M=64, BLOCK_N=128, GROUP_M=2)  # few programs: fast in the interpreter


def _general(m, n, k, seed):
    """Random activations/weights quantized by the twins (arbitrary fp8 codes and scales)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp2(torch.empty(m, 1).uniform_(-4, 4, generator=g))
    w = torch.randn(n, k, generator=g) * 0.05
    a, a_s = reference.act_quant(x)
    q, w_s = reference.weight_quant(w)
    return a, a_s, q, w_s


def _exact_sum(m, n, k, seed, pow2_scales=False):
    """fp8 operands in {j/4 : |j| <= 7}: every product is a multiple of 1/16 and every 128-long
    K-block sum stays below 2^13 of those units, so each block dot product is EXACT in fp32 in
    any summation order. Scales are arbitrary fp32 (then the result is fixed by the order of the
    scale multiplications and block additions alone) or, with pow2_scales, powers of two in
    [1/8, 1] (then every partial sum is exact too, whatever the grouping of the K blocks)."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.randint(-7, 8, (m, k), generator=g).float() / 4).to(FP8)
    q = (torch.randint(-7, 8, (n, k), generator=g).float() / 4).to(FP8)
    kb = -(-k // 128)
    nb = -(-n // 128)
    if pow2_scales:
        a_s = torch.exp2(torch.randint(-3, 1, (m, kb), generator=g).float())
        w_s = torch.exp2(torch.randint(-3, 1, (nb, kb), generator=g).float())
    else:
        a_s = torch.rand(m, kb, generator=g) * 1e-2 + 1e-3
        w_s = torch.rand(nb, kb, generator=g) * 1e-2 + 1e-3
    return a, a_s, q, w_s


def _fp64_reference(a, a_s, q, w_s):
    m, k = a.shape
    a64 = a.double() * a_s.double().repeat_interleave(128, dim=1)[:, :k]  # (M, K)
    w64 = reference.weight_dequant(q, w_s, 128, torch.float64)  # (N, K)
    return a64 @ w64.T


SHAPES = [(1, 576, 320), (77, 576, 320), (16, 256, 1024), (33, 200, 200)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_fp32_out_matches_fp64(m, n, k):
    a, a_s, q, w_s = _general(m, n, k, seed=m + n + k)
    c = fp8_gemm(a, a_s, q, w_s, torch.float32, config=BIG_TILE)
    ref = _fp64_reference(a, a_s, q, w_s)
    assert c.shape == (m, n) and c.dtype == torch.float32
    err = (c.double() - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, err
    twin = reference.fp8_gemm(a, a_s, q, w_s, torch.float32)
    assert (c - twin).abs().max() / twin.abs().max() <= 1e-6


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bf16_out_is_rne_of_fp32_out(m, n, k):
    """The kernel's bf16 output is exactly RNE(its fp32 accumulator): the rounding adds nothing."""
    a, a_s, q, w_s = _general(m, n, k, seed=7 * m + k)
    c32 = fp8_gemm(a, a_s, q, w_s, torch.float32, config=BIG_TILE)
    c16 = fp8_gemm(a, a_s, q, w_s, torch.bfloat16, config=BIG_TILE)
    assert c16.dtype == torch.bfloat16
    assert torch.equal(c16.view(torch.int16), c32.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("m,n,k", [(1, 576, 320), (77, 576, 320)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bit_exact_vs_twin_when_block_dots_are_exact(m, n, k, out_dtype):
    """Bit-exactness honestly claimable: equal to the torch twin bit for bit whenever each 128-wide
    block dot product is exact in fp32 (then only the fixed scale/accumulation order matters)."""
    a, a_s, q, w_s = _exact_sum(m, n, k, seed=m)
    c = fp8_gemm(a, a_s, q, w_s, out_dtype, config=BIG_TILE)
    twin = reference.fp8_gemm(a, a_s, q, w_s, out_dtype)
    assert torch.equal(c.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32),
                       twin.view(torch.int16 if out_dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("split_k", [2, 3, 8])
def test_split_k_equals_non_split(split_k):
    m, n, k = 1, 192, 1000  # 8 K blocks, the last one ragged; a ragged N tile
    cfg = TileConfig(BLOCK_M=16, BLOCK_N=128, SPLIT_K=split_k)
    # fully exact inputs: any grouping of the K blocks gives the same bits, so equality checks
    # that the splits cover every K block exactly once (and the reduce/rounding path)
    a, a_s, q, w_s = _exact_sum(m, n, k, seed=split_k, pow2_scales=True)
    for dtype in (torch.float32, torch.bfloat16):
        whole = fp8_gemm(a, a_s, q, w_s, dtype, config=TileConfig(16, 128))
        assert torch.equal(fp8_gemm(a, a_s, q, w_s, dtype, config=cfg), whole)
        assert torch.equal(whole, reference.fp8_gemm(a, a_s, q, w_s, dtype))
    a, a_s, q, w_s = _general(m, n, k, seed=split_k)  # general inputs: fp32 reassociation only
    whole = fp8_gemm(a, a_s, q, w_s, torch.float32, config=TileConfig(16, 128))
    split = fp8_gemm(a, a_s, q, w_s, torch.float32, config=cfg)
    assert (split - whole).abs().max() / whole.abs().max() <= 1e-6


def test_column_major_activation_scales():
    x = torch.randn(77, 320, generator=torch.Generator().manual_seed(5))
    a, a_s = act_quant(x, column_major_scales=True)
    _, _, q, w_s = _general(1, 576, 320, seed=5)
    c = fp8_gemm(a, a_s, q, w_s, torch.float32, config=BIG_TILE)
    assert torch.equal(c, fp8_gemm(a, a_s.contiguous(), q, w_s, torch.float32, config=BIG_TILE))


def test_default_tile_from_table_and_small_tiles():
    a, a_s, q, w_s = _general(3, 130, 160, seed=9)  # default config path, tiny tails everywhere
    c = fp8_gemm(a, a_s, q, w_s, torch.float32)
    ref = _fp64_reference(a, a_s, q, w_s)
    assert (c.double() - ref).abs().max() / ref.abs().max() <= 1e-5


def test_tile_table_and_legality_checks():
    assert get_tile(2112, 7168, 1).SPLIT_K == 4  # table entry
    assert get_tile(123, 456, 4096) == get_tile(999, 999, 5000)  # default "large" bucket
    check_tile(get_tile(2112, 7168, 1), 128)
    with pytest.raises(ValueError, match="block_k"):
        check_tile(TileConfig(16, 64), 16)  # fp8 dot K < 32
    with pytest.raises(ValueError, match="BLOCK_M"):
        check_tile(TileConfig(24, 64), 128)  # not a power of two
    with pytest.raises(ValueError, match="BLOCK_N"):
        check_tile(TileConfig(16, 8), 128)
    with pytest.raises(ValueError, match="shared memory"):
        check_tile(TileConfig(256, 256, num_stages=4), 128)


def test_every_table_entry_is_gpu_legal():
    table = json.loads(TILES_FILE.read_text())
    n_entries = len(table["default"]) + len(table["moe"]) - 1 + sum(map(len, table["shapes"].values()))
    configs = all_tiles()
    assert 0 < len(configs) <= n_entries
    for cfg in configs:
        check_tile(cfg, 128)


def test_fp8_gemm_rejects_bad_input():
    a, a_s, q, w_s = _general(4, 256, 256, seed=1)
    with pytest.raises(ValueError, match="a:"):
        fp8_gemm(a.float(), a_s, q, w_s)
    with pytest.raises(ValueError, match="a_s"):
        fp8_gemm(a, a_s[:, :1], q, w_s)
    with pytest.raises(ValueError, match="w:"):
        fp8_gemm(a, a_s, q[:, :128], w_s)
    with pytest.raises(ValueError, match="out_dtype"):
        fp8_gemm(a, a_s, q, w_s, torch.float16)
