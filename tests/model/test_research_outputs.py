"""model(ids, outputs=...): per-layer hidden states and routing, against transformers on the same weights."""

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.model import ModelOutput

transformers = pytest.importorskip("transformers")
TOL = 1e-4


@pytest.fixture(scope="module")
def pair(tiny_bf16):
    ours = dsm.from_pretrained(tiny_bf16, dtype=torch.float32)
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tiny_bf16, dtype=torch.float32).eval()
    return ours, theirs


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(7))


def test_hidden_states_and_router_match_transformers(pair, ids):
    ours, theirs = pair
    captured = []  # what transformers' routers return: (logits, weights, indices)
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: captured.append(out))
             for layer in theirs.model.layers if hasattr(layer.mlp, "gate")]
    try:
        with torch.no_grad():
            out = ours(ids, outputs={"hidden_states", "router"})
            ref = theirs(ids, output_hidden_states=True, output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(out, ModelOutput) and out.mtp_logits is None
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.cfg.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
    torch.testing.assert_close(out.logits, ref.logits, rtol=TOL, atol=TOL)
    moe_layers = [i for i in range(ours.cfg.num_hidden_layers) if ours.cfg.is_moe_layer(i)]
    assert [r.layer for r in out.router] == [f"layers.{i}.ffn" for i in moe_layers]
    assert len(ref.router_logits) == len(captured) == len(out.router)
    b, t = ids.shape
    for r, logits, (_, w, idx) in zip(out.router, ref.router_logits, captured):
        e, k = ours.cfg.n_routed_experts, ours.cfg.num_experts_per_tok
        assert r.logits.shape == r.scores.shape == (b, t, e) and r.indices.shape == r.weights.shape == (b, t, k)
        torch.testing.assert_close(r.logits.reshape(b * t, e), logits, rtol=TOL, atol=TOL)
        torch.testing.assert_close(r.scores, r.logits.sigmoid(), rtol=0, atol=0)
        # transformers' top-k is unsorted: compare each token's (expert, weight) pairs as sets
        mine = torch.sort(r.indices.reshape(b * t, k), dim=-1)
        theirs_sorted = torch.sort(idx, dim=-1)
        assert torch.equal(mine.values, theirs_sorted.values)
        torch.testing.assert_close(r.weights.reshape(b * t, k).gather(1, mine.indices),
                                   w.gather(1, theirs_sorted.indices), rtol=TOL, atol=TOL)


def test_outputs_change_nothing_and_stay_off_the_modules(pair, ids):
    ours, _ = pair
    with torch.no_grad():
        plain = ours(ids)
        out = ours(ids, outputs=("router", "mtp_logits", "hidden_states"))
        mtp = ours.mtp_logits(ids)
    assert torch.equal(out.logits, plain) and torch.equal(out.mtp_logits, mtp)
    assert out.router[-1].layer == "mtp.block.ffn" and out.router[-1].indices.shape[:2] == (2, ids.shape[1] - 1)
    assert all(getattr(m, "last_routing", None) is None for m in ours.modules())


def test_outputs_while_decoding(pair, ids):
    ours, _ = pair
    cache = ours.new_cache()
    with torch.no_grad():
        full = ours(ids, outputs={"router"})
        ours(ids[:, :-1], 0, cache)
        step = ours(ids[:, -1:], ids.shape[1] - 1, cache, outputs={"router", "hidden_states"})
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=TOL, atol=TOL)
    for a, b in zip(step.router, full.router):
        assert a.indices.shape[1] == 1 and torch.equal(a.indices[:, 0], b.indices[:, -1])
    assert all(h.shape == (2, 1, ours.cfg.hidden_size) for h in step.hidden_states)


def test_bad_outputs_are_refused(pair, ids):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"outputs: unknown \['attentions'\]"):
        ours(ids, outputs={"attentions"})
    with pytest.raises(ValueError, match="mtp_logits needs a plain full prefill"):
        ours(ids, 0, ours.new_cache(), outputs={"mtp_logits"})
