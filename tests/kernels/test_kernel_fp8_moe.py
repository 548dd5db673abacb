"""Triton fused MoE vs the per-expert torch twin; moe_align_block_size bookkeeping."""

import pytest
import torch

from deepseek_model.kernels import ops, reference
from deepseek_model.kernels.fp8_moe import fused_moe, moe_align_block_size
from deepseek_model.kernels.tiles import TileConfig


def _experts(num_experts, hidden, inter, gen):
    w13, w13_s, w2, w2_s = [], [], [], []
    for _ in range(num_experts):
        q, s = reference.weight_quant(torch.randn(2 * inter, hidden, generator=gen) * 0.05)
        w13.append(q)
        w13_s.append(s)
        q, s = reference.weight_quant(torch.randn(hidden, inter, generator=gen) * 0.05)
        w2.append(q)
        w2_s.append(s)
    return torch.stack(w13), torch.stack(w13_s), torch.stack(w2), torch.stack(w2_s)


def _routing(tokens, top_k, used_experts, gen):
    """Distinct experts per token drawn from `used_experts` only (the rest get zero tokens)."""
    scores = torch.rand(tokens, len(used_experts), generator=gen)
    ids = torch.tensor(used_experts)[scores.topk(top_k, dim=1).indices]  # (T, topk)
    weights = torch.rand(tokens, top_k, generator=gen) * 2.5
    return weights, ids


def test_moe_align_block_size_layout():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])  # expert 1 has no tokens
    sorted_ids, expert_ids = moe_align_block_size(ids, num_experts=5, block_m=4)
    sentinel = ids.numel()
    assert expert_ids.tolist() == [0, 2, 3]  # one block each; experts 1 and 4 get no block
    assert sorted_ids.tolist() == [1, 4, sentinel, sentinel, 0, 2, 5, sentinel, 3] + [sentinel] * 3


@pytest.mark.parametrize("tokens,hidden,inter,dtype,fmt", [
    (1, 256, 128, torch.float32, None),  # decode: a single token, most experts idle
    (37, 320, 192, torch.float32, None),  # ragged H and I (not multiples of 128)
    (24, 256, 128, torch.bfloat16, "ue8m0"),
])
def test_fused_moe_matches_twin(tokens, hidden, inter, dtype, fmt):
    g = torch.Generator().manual_seed(tokens + hidden)
    num_experts, top_k = 8, 2
    w13, w13_s, w2, w2_s = _experts(num_experts, hidden, inter, g)
    weights, ids = _routing(tokens, top_k, [0, 2, 3, 5, 6], g)  # experts 1, 4, 7 get zero tokens
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    cfg = TileConfig(BLOCK_M=16, BLOCK_N=128)
    out = fused_moe(x, weights, ids, w13, w13_s, w2, w2_s, 128, fmt, config=cfg)
    ref = reference.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s, 128, fmt)
    assert out.shape == (tokens, hidden) and out.dtype == dtype
    if dtype == torch.float32:
        assert (out - ref).abs().max() / ref.abs().max() <= 1e-5
    else:  # both round one fp32 result to bf16: at most one bf16 ulp apart
        assert (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()


def test_fused_moe_default_tiles_and_dispatch():
    g = torch.Generator().manual_seed(3)
    w13, w13_s, w2, w2_s = _experts(4, 128, 128, g)
    weights, ids = _routing(5, 2, [0, 1, 3], g)
    x = torch.randn(5, 128, generator=g)
    out = ops.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s, backend="triton")
    ref = ops.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s, backend="auto")
    assert (out - ref).abs().max() / ref.abs().max() <= 1e-5


def test_fused_moe_twin_equals_dense_fp64_math():
    """Independent check of the twin itself: dequantized fp64 SwiGLU experts, summed by weight."""
    g = torch.Generator().manual_seed(4)
    w13, w13_s, w2, w2_s = _experts(3, 128, 128, g)
    weights, ids = _routing(6, 2, [0, 1, 2], g)
    x = torch.randn(6, 128, generator=g)
    got = reference.fused_moe(x, weights, ids, w13, w13_s, w2, w2_s).double()
    want = torch.zeros(6, 128, dtype=torch.float64)
    for t in range(6):
        for j in range(2):
            e = int(ids[t, j])
            a = reference.act_quant(x[t:t + 1])
            a64 = a[0].double() * a[1].double().repeat_interleave(128, 1)
            gu = a64 @ reference.weight_dequant(w13[e], w13_s[e], 128, torch.float64).T
            h = torch.nn.functional.silu(gu[:, :128]) * gu[:, 128:]
            hq = reference.act_quant(h.float())
            h64 = hq[0].double() * hq[1].double().repeat_interleave(128, 1)
            want[t] += weights[t, j].double() * (h64 @ reference.weight_dequant(w2[e], w2_s[e], 128, torch.float64).T)[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-5


def test_fused_moe_rejects_bad_input():
    g = torch.Generator().manual_seed(5)
    w13, w13_s, w2, w2_s = _experts(2, 128, 128, g)
    x = torch.randn(3, 128, generator=g)
    ids = torch.tensor([[0], [1], [2]])
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, torch.ones(3, 1), ids, w13, w13_s, w2, w2_s)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, torch.ones(3, 1), ids.clamp_max(1), w13, w13_s, w2[:, :64], w2_s)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, torch.ones(3, 2), ids.clamp_max(1), w13, w13_s, w2, w2_s)


def test_stack_experts_matches_separate_gate_up_down():
    """Checkpoint layout (separate gate/up/down per expert) → fused layout, same math as the MLP."""
    g = torch.Generator().manual_seed(6)
    hidden, inter = 192, 128
    mats = [[reference.weight_quant(torch.randn(*shape, generator=g) * 0.05)
             for shape in ((inter, hidden), (inter, hidden), (hidden, inter))] for _ in range(3)]
    w13, w13_s, w2, w2_s = reference.stack_experts([m[0] for m in mats], [m[1] for m in mats],
                                                   [m[2] for m in mats])
    x = torch.randn(4, hidden, generator=g)
    ids = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0]])
    weights = torch.rand(4, 2, generator=g)
    got = fused_moe(x, weights, ids, w13, w13_s, w2, w2_s, config=TileConfig(16, 128))
    want = torch.zeros(4, hidden)
    for t in range(4):
        for j in range(2):
            (gq, gs), (uq, us), (dq, ds) = mats[int(ids[t, j])]
            xt = x[t:t + 1]
            h = torch.nn.functional.silu(ops.linear(xt, gq, gs)) * ops.linear(xt, uq, us)
            want[t] += weights[t, j] * ops.linear(h, dq, ds)[0]
    assert (got - want).abs().max() / want.abs().max() <= 1e-5
    with pytest.raises(ValueError, match="intermediate size"):
        reference.stack_experts([(gq[:100], gs)], [(uq[:100], us)], [(dq, ds)])
