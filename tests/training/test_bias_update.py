"""Auxiliary-loss-free balancing: the router's load counts and the γ·sign bias update."""

import pytest
import torch

from deepseek_model.moe import Gate
from deepseek_model.training import (GAMMA, BiasUpdater, balance_loss, build_model, forward_train,
                                     forward_train_outputs, lm_loss)


def _gate(cfg):
    return Gate(cfg, torch.float32, "cpu")


class _Holder(torch.nn.Module):
    def __init__(self, gate):
        super().__init__()
        self.gate = gate


def test_update_direction_and_magnitude(micro_cfg):
    # 8 experts, mean load 10: overloaded experts go down by γ, underloaded up by γ, average ones stay.
    gate = _gate(micro_cfg)
    start = torch.linspace(-0.2, 0.2, 8)
    gate.bias.copy_(start)
    updater = BiasUpdater(_Holder(gate), gamma=GAMMA)
    updater.counts["gate"].copy_(torch.tensor([30, 10, 0, 5, 15, 10, 2, 8]))
    stats = updater.step()
    expected = start + GAMMA * torch.tensor([-1.0, 0.0, 1.0, 1.0, -1.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(gate.bias, expected, rtol=0, atol=1e-9)
    assert updater.counts["gate"].sum() == 0  # counts reset for the next step
    assert stats["gate"].max_over_mean == pytest.approx(3.0)
    assert stats["gate"].counts.tolist() == [30, 10, 0, 5, 15, 10, 2, 8]


def test_recentred_update_has_zero_mean(micro_cfg):
    gate = _gate(micro_cfg)
    updater = BiasUpdater(_Holder(gate), gamma=0.01, recenter=True)
    updater.counts["gate"].copy_(torch.tensor([40, 0, 0, 0, 0, 0, 0, 0]))  # one up... seven down: raw update mean ≠ 0
    updater.step()
    assert abs(gate.bias.sum().item()) < 1e-7
    raw = torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, 1]) * 0.01
    torch.testing.assert_close(gate.bias, raw - raw.mean())


def test_gamma_zero_keeps_bias_and_rejects_negative(micro_cfg):
    gate = _gate(micro_cfg)
    updater = BiasUpdater(_Holder(gate), gamma=0.0)
    updater.counts["gate"].copy_(torch.arange(8))
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
        out = forward_train_outputs(model, ids)
        updater.record(out.router)
        for r in out.router:
            counts = torch.bincount(r.indices.flatten(), minlength=micro_cfg.n_routed_experts)
            expected[r.layer] = expected.get(r.layer, 0) + counts
    forward_train(model, batches[0])  # a forward that is not recorded counts nothing
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
    out = forward_train_outputs(model, ids)
    (lm_loss(out.logits, ids) + balance_loss(out.router, alpha=1.0)).backward()
    params = {id(p) for p in model.parameters()}
    for g in gates:
        assert id(g.bias) not in params and not g.bias.requires_grad and g.bias.grad is None
        assert g.weight.grad is not None and g.weight.grad.abs().sum() > 0  # the router itself does learn


def test_nothing_is_left_on_the_modules(micro_cfg):
    """Routing is returned, never kept: no load buffers, flags or last routings on the modules."""
    model = build_model(micro_cfg, seed=0)
    updater = BiasUpdater(model, gamma=0.01)
    out = forward_train_outputs(model, torch.zeros(1, 8, dtype=torch.long))
    assert [r.layer for r in out.router] == ["layers.1.ffn", "mtp.block.ffn"]
    assert "load" not in " ".join(model.state_dict())  # never written to checkpoints
    for m in model.modules():
        assert not any(hasattr(m, a) for a in ("load", "record_load", "last_routing", "last_token_shape"))
    assert all(int(c.sum()) == 0 for c in updater.counts.values())  # not recorded: nothing counted
    with pytest.raises(ValueError, match="layer 'layers.0.ffn' is not a router of this model"):
        updater.record([type(out.router[0])("layers.0.ffn", *(torch.zeros(1),) * 4)])


def test_attach_runs_the_update_after_each_optimizer_step(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    updater = BiasUpdater(model, gamma=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = updater.attach(opt)
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    out = forward_train_outputs(model, ids)
    updater.record(out.router)
    lm_loss(out.logits, ids).backward()
    gate = model.layers[1].ffn.gate
    load = updater.counts["layers.1.ffn"].double().clone()
    opt.step()
    torch.testing.assert_close(gate.bias, (0.01 * torch.sign(load.mean() - load)).float())
    assert int(updater.counts["layers.1.ffn"].sum()) == 0
    assert updater.last_stats["layers.1.ffn"].counts.tolist() == load.long().tolist()
    handle.remove()
