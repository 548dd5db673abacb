"""group_advantages and grpo_loss against an independent float64 re-derivation, value and gradient."""

import math

import pytest
import torch

from deepseek_model.rl import group_advantages, grpo_loss, grpo_terms


# ----------------------------------------------------------------------------- re-derivations (plain loops)
def ref_advantages(rewards, g, eps):
    out = []
    for s in range(0, len(rewards), g):
        grp = rewards[s:s + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
        out += [(x - mean) / (std + eps) for x in grp]
    return out


def ref_loss_and_grad(lp, old, ref, adv, mask, eps, beta):
    """-J and dJ/dlp by hand: per output mean over its tokens, then mean over outputs."""
    n_out, t_len = len(lp), len(lp[0])
    total, grad = 0.0, [[0.0] * t_len for _ in range(n_out)]
    for i in range(n_out):
        n_tok = sum(1 for t in range(t_len) if mask[i][t])
        acc = 0.0
        for t in range(t_len):
            if not mask[i][t]:
                continue
            ratio = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            clipped_ratio = min(max(ratio, 1 - eps), 1 + eps)
            surrogate = min(ratio * a, clipped_ratio * a)
            d = ref[i][t] - lp[i][t]
            kl = math.exp(d) - d - 1
            acc += surrogate - beta * kl
            clip_side = (a > 0 and ratio > 1 + eps) or (a < 0 and ratio < 1 - eps)
            d_surrogate = 0.0 if clip_side else ratio * a
            d_kl = -math.exp(d) + 1  # d/dlp of exp(ref - lp) - (ref - lp) - 1
            grad[i][t] = -(d_surrogate - beta * d_kl) / n_tok / n_out
        total += acc / n_tok
    return -total / n_out, grad


def random_case(n, t, seed, spread=0.4):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    lp = old + torch.randn(n, t, generator=gen, dtype=torch.float64) * spread  # ratios inside and outside 1 ± 0.2
    ref = old + torch.randn(n, t, generator=gen, dtype=torch.float64) * spread
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, t, generator=gen) < 0.7
    mask[:, 0] = True  # every output has a token
    return lp, old, ref, adv, mask


# ----------------------------------------------------------------------------- group_advantages
@pytest.mark.parametrize("p, g", [(1, 2), (3, 4), (5, 8), (2, 16)])
def test_advantages_match_rederivation(p, g):
    r = torch.randn(p * g, generator=torch.Generator().manual_seed(p * 100 + g), dtype=torch.float64)
    got = group_advantages(r, g, eps=1e-4)
    want = torch.tensor(ref_advantages(r.tolist(), g, 1e-4), dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (p * g,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_advantages_binary_rewards_known_values():
    # group [1, 0, 0, 0]: mean 0.25, unbiased std 0.5 → (0.75/0.5, -0.25/0.5) = (1.5, -0.5)
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, eps=0.0)
    assert got.tolist() == [1.5, -0.5, -0.5, -0.5]


def test_advantages_zero_for_equal_rewards():
    r = torch.tensor([0.3] * 4 + [1.0] * 4 + [0.0] * 4)
    got = group_advantages(r, 4)
    assert torch.equal(got, torch.zeros(12))


def test_advantages_refusals():
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        group_advantages(torch.tensor([1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="rewards: length 5 is not a positive multiple of group_size 2"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="rewards: 1 NaN or infinite value"):
        group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="rewards: 2 NaN or infinite value"):
        group_advantages(torch.tensor([1.0, float("inf"), float("-inf"), 1.0]), 2)
    with pytest.raises(ValueError, match="rewards must be a 1-D tensor"):
        group_advantages(torch.ones(2, 2), 2)


def test_advantages_integer_rewards_become_float():
    got = group_advantages(torch.tensor([1, 0, 1, 1]), 2, eps=0.0)
    s = 1 / math.sqrt(2)  # unbiased std of {1, 0}: sqrt(0.5)
    torch.testing.assert_close(got, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.0]))


# ----------------------------------------------------------------------------- grpo_loss
@pytest.mark.parametrize("n, t, seed", [(1, 1, 0), (3, 5, 1), (8, 17, 2), (16, 3, 3)])
@pytest.mark.parametrize("eps, beta", [(0.2, 0.04), (0.1, 0.5), (0.3, 0.0)])
def test_loss_value_and_gradient_match_rederivation(n, t, seed, eps, beta):
    lp, old, ref, adv, mask = random_case(n, t, seed)
    lp.requires_grad_(True)
    loss = grpo_loss(lp, old, ref, adv, mask, clip_eps=eps, kl_coef=beta)
    loss.backward()
    want, want_grad = ref_loss_and_grad(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                        eps, beta)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(lp.grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_float_mask_and_padding_values_do_not_matter():
    lp, old, ref, adv, mask = random_case(4, 6, 7)
    base = grpo_loss(lp, old, ref, adv, mask)
    junk = lp.masked_fill(~mask, float("-inf")), old.masked_fill(~mask, 5.0), ref.masked_fill(~mask, float("nan"))
    assert grpo_loss(*junk, adv, mask.double()).item() == base.item()


def test_no_gradient_into_old_ref_or_advantages():
    lp, old, ref, adv, mask = random_case(3, 4, 5)
    for x in (old, ref, adv):
        x.requires_grad_(True)
    lp.requires_grad_(True)
    grpo_loss(lp, old, ref, adv, mask).backward()
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert lp.grad.abs().sum().item() > 0


def test_clip_active_only_outside_band():
    eps = 0.2
    ratios = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 1.5], dtype=torch.float64)
    old = torch.full((1, 7), -1.0, dtype=torch.float64)
    mask = torch.ones(1, 7, dtype=torch.bool)
    for a, zero in ((1.0, [False, False, False, False, False, True, True]),
                    (-1.0, [True, True, False, False, False, False, False])):
        lp = (old + ratios.log()).requires_grad_(True)
        terms = grpo_terms(lp, old, lp.detach(), torch.tensor([a], dtype=torch.float64), mask, eps, 0.0)
        terms.loss.backward()
        want = torch.where(torch.tensor(zero), torch.zeros(7, dtype=torch.float64), -a * ratios / 7)
        torch.testing.assert_close(lp.grad[0], want, rtol=1e-12, atol=0.0)
        assert terms.clip_fraction.item() == pytest.approx(2 / 7)


def test_kl_zero_when_policy_is_reference():
    lp, old, _, adv, mask = random_case(5, 9, 11)
    lp.requires_grad_(True)
    terms = grpo_terms(lp, old, lp.detach().clone(), adv, mask, 0.2, 0.04)
    assert terms.kl.item() == 0.0
    assert terms.loss.item() == grpo_loss(lp, old, lp.detach(), adv, mask, 0.2, 0.0).item()
    terms.loss.backward()  # the KL gradient at π = π_ref is zero too
    lp2 = lp.detach().clone().requires_grad_(True)
    grpo_loss(lp2, old, lp2.detach(), adv, mask, 0.2, 0.0).backward()
    torch.testing.assert_close(lp.grad, lp2.grad, rtol=0, atol=1e-15)


def test_loss_is_minus_mean_weighted_ratio_without_kl_or_clip():
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 5, generator=gen, dtype=torch.float64)
    lp = old + (torch.rand(6, 5, generator=gen, dtype=torch.float64) - 0.5) * 0.2  # ratios in (0.905, 1.106)
    adv = torch.randn(6, generator=gen, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[2, 3:] = False
    ratio = (lp - old).exp()
    want = -torch.stack([(ratio[i][mask[i]] * adv[i]).mean() for i in range(6)]).mean()
    got = grpo_terms(lp, old, old, adv, mask, 0.2, 0.0)
    assert got.clip_fraction.item() == 0.0
    assert got.loss.item() == pytest.approx(want.item(), rel=1e-13)


def test_ratio_one_gives_minus_mean_advantage():
    lp, _, ref, adv, mask = random_case(4, 3, 2)
    assert grpo_loss(lp, lp, ref, adv, mask, kl_coef=0.0).item() == pytest.approx(-adv.mean().item(), rel=1e-13)


def test_loss_refusals():
    lp, old, ref, adv, mask = random_case(3, 4, 0)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="mask: row 1 has no tokens"):
        grpo_loss(lp, old, ref, adv, empty)
    with pytest.raises(ValueError, match=r"old_logprobs must have shape \(3, 4\)"):
        grpo_loss(lp, old[:, :3], ref, adv, mask)
    with pytest.raises(ValueError, match=r"ref_logprobs must have shape \(3, 4\)"):
        grpo_loss(lp, old, ref[:2], adv, mask)
    with pytest.raises(ValueError, match=r"advantages must have shape \(3,\)"):
        grpo_loss(lp, old, ref, adv[:2], mask)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\)"):
        grpo_loss(lp, old, ref, adv, mask.T)
    with pytest.raises(ValueError, match="logprobs must be a \\(N, T\\) tensor"):
        grpo_loss(lp[0], old, ref, adv, mask)
    with pytest.raises(ValueError, match="mask must hold only 0/1"):
        grpo_loss(lp, old, ref, adv, mask.double() * 2)
    with pytest.raises(ValueError, match="clip_eps must be >= 0"):
        grpo_loss(lp, old, ref, adv, mask, clip_eps=-0.1)
