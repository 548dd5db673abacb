"""The few-token (decoding) and sorted-pairs (prefill) paths of the MoE layer against its per-expert
loop, in float64."""

import torch

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.layers import LinearSpec
from deepseek_model.moe import FEW_PAIRS, MoE


def _moe(seed=0, dtype=torch.float64):
    cfg = ModelConfig.from_dict(builtin_config_dict("tiny"))
    moe = MoE(cfg, LinearSpec(dtype=dtype))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.2)
        moe.gate.bias.copy_(torch.randn(cfg.n_routed_experts, generator=gen) * 0.1 - 0.05)  # negative entries too
    return cfg, moe


def _loop(moe, x):
    """The per-expert loop (the training-mode path), without keeping a graph."""
    moe.train()
    with torch.no_grad():
        y = moe(x)
    moe.eval()
    return y


def _runs_of(indices, e):
    rows = [i for i, row in enumerate(indices.tolist()) if e in row]
    return rows and rows[-1] - rows[0] + 1 != len(rows)


def test_few_tokens_equal_the_loop_for_one_to_four_tokens():
    cfg, moe = _moe()
    gen = torch.Generator().manual_seed(1)
    scattered = 0  # cases where an expert's tokens are not consecutive rows (the gather path)
    for n in (1, 2, 3, 4):
        assert n * cfg.num_experts_per_tok <= FEW_PAIRS
        for _ in range(4):
            x = torch.randn(1, n, cfg.hidden_size, generator=gen, dtype=torch.float64)
            moe.eval()
            with torch.no_grad():
                y = moe(x)
            ref = _loop(moe, x)
            torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
            idx = moe.gate(x[0]).indices
            scattered += any(_runs_of(idx, e) for e in range(cfg.n_routed_experts))
    assert scattered > 0


def test_stacked_weights_are_the_parameters():
    """After the decoding path stacked the experts, a training step still reaches what it reads."""
    cfg, moe = _moe(seed=2)
    x = torch.randn(1, 2, cfg.hidden_size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moe.eval()
    with torch.no_grad():
        before = moe(x)
    weights_before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    moe.train()
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    moe(x).square().sum().backward()
    opt.step()
    moe.eval()
    with torch.no_grad():
        after = moe(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _loop(moe, x), rtol=1e-12, atol=1e-12)
    changed = [n for n, p in moe.named_parameters() if not torch.equal(p, weights_before[n])]
    assert any(n.startswith("experts.") for n in changed)  # the step reached the experts the fast path reads


def test_many_tokens_sorted_by_expert_equal_the_loop():
    """Past the few-token limit, inference sorts the (token, expert) pairs by expert: same sums in
    the same (ascending expert) order as the per-expert loop, bit for bit in float64."""
    cfg, moe = _moe(seed=4)
    gen = torch.Generator().manual_seed(5)
    for bsz, n in ((1, FEW_PAIRS // cfg.num_experts_per_tok + 1), (2, 37)):  # just past the limit; a batch
        x = torch.randn(bsz, n, cfg.hidden_size, generator=gen, dtype=torch.float64)
        moe.eval()
        with torch.no_grad():
            y = moe(x)
        torch.testing.assert_close(y, _loop(moe, x), rtol=0, atol=0)
