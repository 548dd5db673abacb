"""Auxiliary-loss-free balancing: the router's load counts and the γ·sign bias update."""

import pytest
import torch

from deepseek_model.moe import Gate
from deepseek_model.training import GAMMA, BiasUpdater, balance_loss, build_model, forward_train, lm_loss


def _gate_with_load(cfg, load):
    gate = Gate(cfg, torch.float32, "cpu")
    gate.load.copy_(torch.tensor(load))
    return gate


class _Holder(torch.nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate


def test_update_direction_and_magnitude(micro_cfg):
    # 8 experts, mean load 10: overloaded experts go down by γ, underloaded up by γ, average ones stay.
    gate = _gate_with_load(micro_cfg, [30, 10, 0, 5, 15, 10, 2, 8])
    start = torch.linspace(-0.2, 0.2, 8)
    gate.bias.copy_(start)
    updater = BiasUpdater(_Holder(gate), gamma=GAMMA)
    gate.load.copy_(torch.tensor([30, 10, 0, 5, 15, 10, 2, 8]))  # construction resets the counts
    stats = updater.step()
    expected = start + GAMMA * torch.tensor([-1.0, 0.0, 1.0, 1.0, -1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(gate.bias, expected, rtol=0, atol=1e-9)
    assert gate.load.sum() == 0  # counts reset for the next step
    assert stats["gate"].max_over_mean == pytest.approx(3.0)
    assert stats["gate"].counts.tolist() == [30, 10, 0, 5, 15, 10, 2, 8]


def test_recentred_update_has_zero_mean(micro_cfg):
    gate = _gate_with_load(micro_cfg, [0] * 8)
    updater = BiasUpdater(_Holder(gate), gamma=0.01, recenter=True)
    gate.load.copy_(torch.tensor([40, 0, 0, 0, 0, 0, 0, 0]))  # one up... seven down: raw update mean ≠ 0
    updater.step()
    assert abs(gate.bias.sum().item()) < 1e-7
    raw = torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1]) * 0.01
    torch.testing.assert_close(gate.bias, raw - raw.mean())


def test_gamma_zero_keeps_bias_and_rejects_negative(micro_cfg):
    gate = _gate_with_load(micro_cfg, [0] * 8)
    updater = BiasUpdater(_Holder(gate), gamma=0.0)
    gate.load.copy_(torch.arange(8))
    updater.step()
    assert gate.bias.abs().sum() == 0
    with pytest.raises(ValueError, match="gamma"):
        BiasUpdater(_Holder(gate), gamma=-1.0)


def test_counts_accumulate_over_micro_batches(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    updater = BiasUpdater(model, gamma=GAMMA)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, micro_cfg.vocab_size, (2, 12), generator=gen) for _ in range(3)]
    expected = {}
    for ids in batches:
        forward_train(model, ids)
        for name, moe in [(n, m) for n, m in model.named_modules() if n.endswith("ffn") and hasattr(m, "gate")]:
            counts = torch.bincount(moe.last_routing.indices.flatten(), minlength=micro_cfg.n_routed_experts)
            expected[name] = expected.get(name, 0) + counts
    stats = updater.step()
    # one MoE layer in the trunk (layer 1) and one in the MTP block
    assert sorted(stats) == ["layers.1.ffn", "mtp.block.ffn"]
    for name, s in stats.items():
        assert s.counts.tolist() == expected[name].tolist()
    # main trunk: 3 micro-batches × 2 × 12 tokens × K=2; MTP: 3 × 2 × 11 × 2
    assert int(stats["layers.1.ffn"].counts.sum()) == 3 * 2 * 12 * 2
    assert int(stats["mtp.block.ffn"].counts.sum()) == 3 * 2 * 11 * 2


def test_no_gradient_reaches_the_bias(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    with torch.no_grad():
        for g in gates:
            g.bias.uniform_(-0.1, 0.1)
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    logits, _ = forward_train(model, ids)
    (lm_loss(logits, ids) + balance_loss(model, alpha=1.0)).backward()
    params = {id(p) for p in model.parameters()}
    for g in gates:
        assert id(g.bias) not in params and not g.bias.requires_grad and g.bias.grad is None
        assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0  # the router itself does learn


def test_recording_is_off_unless_a_balancer_is_attached(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    forward_train(model, torch.zeros(1, 8, dtype=torch.long))
    assert all(int(g.load.sum()) == 0 for g in model.modules() if isinstance(g, Gate))
    assert "load" not in " ".join(model.state_dict())  # never written to checkpoints


def test_attach_runs_the_update_after_each_optimizer_step(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    updater = BiasUpdater(model, gamma=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = updater.attach(opt)
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    logits, _ = forward_train(model, ids)
    lm_loss(logits, ids).backward()
    gate = model.layers[1].ffn.gate
    load = gate.load.double().clone()
    opt.step()
    torch.testing.assert_close(gate.bias, (0.01 * torch.sign(load.mean() - load)).float())
    assert int(gate.load.sum()) == 0 and updater.last_stats["layers.1.ffn"].counts.tolist() == load.long().tolist()
    handle.remove()
