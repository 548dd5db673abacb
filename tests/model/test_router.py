"""Gate routing: noaux_tc (sigmoid + fp32 bias + top-2 group sums) and the V2 variants."""

import torch

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.moe import Gate


def _gate(overrides, weight_rows, bias=None):
    d = builtin_config_dict("tiny")
    d.update(overrides)
    cfg = ModelConfig.from_dict(d)
    gate = Gate(cfg, torch.float32, "cpu")
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, : weight_rows.shape[1]] = weight_rows
        if bias is not None:
            gate.bias.copy_(bias)
    return cfg, gate


def _x(hidden=256):
    x = torch.zeros(1, hidden)
    x[0, 0] = 1.0
    return x


def test_noaux_tc_negative_bias_and_group_mask():
    # 8 experts in 4 groups of 2, keep 2 groups, pick 2 experts. Logits set scores directly.
    logits = torch.tensor([2.0, 1.9, -1.0, -1.2, 0.5, 0.4, 0.0, -0.1]).unsqueeze(1)
    bias = torch.tensor([-3.0, -3.0, 0.0, 0.0, -0.5, -0.6, -2.0, -2.5])  # all biased scores negative here or small
    cfg, gate = _gate({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
                       "routed_scaling_factor": 2.5}, logits, bias)
    r = gate(_x())
    s = torch.sigmoid(logits[:, 0])
    b = s + bias
    group = b.view(4, 2).sum(-1)  # top-2 of 2 = both
    kept = group.topk(2).indices.tolist()
    assert sorted(kept) == [1, 2]  # groups whose experts are {2,3} and {4,5}
    # within kept groups the best biased scores: experts 2 (0.269) and 3 (0.231) beat 4 (0.122)
    assert sorted(r.indices[0].tolist()) == [2, 3]
    # weights use the UNBIASED sigmoid scores, renormalised, times the scaling factor
    w = s[[2, 3]] / (s[[2, 3]].sum() + 1e-20) * 2.5
    torch.testing.assert_close(r.weights[0].sort().values, w.sort().values)
    torch.testing.assert_close(r.scores[0], s)


def test_masked_groups_use_minus_inf_not_zero():
    # Biased scores in the kept groups are all negative; a 0-fill would let masked experts win.
    logits = torch.tensor([-4.0, -4.0, 3.0, 3.0]).unsqueeze(1)
    bias = torch.tensor([-5.0, -5.0, 0.0, 0.0])
    _, gate = _gate({"n_routed_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}, logits, bias)
    # group 0 biased scores ≈ -4.98 (negative), group 1 ≈ 0.95: group 1 kept
    assert sorted(gate(_x()).indices[0].tolist()) == [2, 3]
    bias2 = torch.tensor([0.0, 0.0, -5.0, -5.0])
    logits2 = torch.tensor([3.0, 3.0, -4.0, -4.0]).unsqueeze(1)
    _, gate2 = _gate({"n_routed_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}, logits2, bias2)
    assert sorted(gate2(_x()).indices[0].tolist()) == [0, 1]
    # now force kept group to have negative biased scores and a masked group with higher raw scores
    logits3 = torch.tensor([5.0, 5.0, -1.0, -1.0]).unsqueeze(1)
    bias3 = torch.tensor([-0.1, -0.1, -0.4, -0.45])
    _, gate3 = _gate({"n_routed_experts": 4, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2}, logits3,
                     bias3)
    r3 = gate3(_x())
    assert sorted(r3.indices[0].tolist()) == [0, 1]
    s = torch.sigmoid(logits3[:, 0])
    assert ((s + bias3)[2:] < 0).all()


def test_bias_changes_selection_not_weights():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7]).unsqueeze(1)
    _, gate = _gate({"n_routed_experts": 4, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 1,
                     "norm_topk_prob": False, "routed_scaling_factor": 1.0}, logits,
                    torch.tensor([0.0, 0.0, 0.0, 0.5]))
    r = gate(_x())
    assert r.indices.tolist() == [[3]]
    torch.testing.assert_close(r.weights, torch.sigmoid(torch.tensor([[0.7]])))


def test_ties_go_to_lower_index():
    logits = torch.zeros(8, 1)
    _, gate = _gate({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}, logits)
    r = gate(_x())
    assert r.indices[0].tolist() == [0, 1, 2]
    torch.testing.assert_close(r.weights[0], torch.full((3,), 2.5 / 3))


def test_v2_softmax_variants():
    logits = torch.tensor([0.1, 2.0, 0.3, 1.5, 1.9, 0.2, 0.0, 0.05]).unsqueeze(1)
    s = torch.softmax(logits[:, 0], 0)
    # greedy: plain top-k of softmax scores, weights not renormalised
    _, greedy = _gate({"n_routed_experts": 8, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
                       "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False,
                       "routed_scaling_factor": 1.0}, logits)
    r = greedy(_x())
    assert greedy.bias is None
    assert r.indices[0].tolist() == [1, 4]
    torch.testing.assert_close(r.weights[0], s[[1, 4]])
    # group_limited_greedy: group score = max; groups {0,1},{2,3},{4,5},{6,7}; keep 2 → groups 0 and 2
    _, glg = _gate({"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3,
                    "scoring_func": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": False,
                    "routed_scaling_factor": 16.0}, logits)
    r = glg(_x())
    assert r.indices[0].tolist() == [1, 4, 5]  # expert 3 (1.5) is in a masked group
    torch.testing.assert_close(r.weights[0], s[[1, 4, 5]] * 16.0)


def test_v2_normalised_weights_are_not_scaled():
    """DeepSeek-V2's gate renormalises the top-k weights (k > 1) *or* multiplies them by
    routed_scaling_factor, never both (its modeling code's `if top_k > 1 and norm_topk_prob: ...
    else: ...`); V3 does both. transformers' V2 port ignores norm_topk_prob: published V2 configs
    set it false, where all agree."""
    logits = torch.tensor([0.1, 2.0, 0.3, 1.5, 1.9, 0.2, 0.0, 0.05]).unsqueeze(1)
    s = torch.softmax(logits[:, 0].double(), 0)
    base = {"n_routed_experts": 8, "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "topk_method": "greedy",
            "routed_scaling_factor": 2.0}
    for model_type, norm, k, want in [
        ("deepseek_v2", True, 2, s[[1, 4]] / s[[1, 4]].sum()),  # normalised, not scaled
        ("deepseek_v2", True, 1, s[[1]] * 2.0),  # k = 1: scaled, not normalised
        ("deepseek_v2", False, 2, s[[1, 4]] * 2.0),  # scaled
        ("deepseek_v3", True, 2, s[[1, 4]] / s[[1, 4]].sum() * 2.0),  # V3: both
    ]:
        _, gate = _gate({**base, "model_type": model_type, "norm_topk_prob": norm, "num_experts_per_tok": k}, logits)
        r = gate(_x())
        torch.testing.assert_close(r.weights[0].double(), want, rtol=1e-6, atol=0)
