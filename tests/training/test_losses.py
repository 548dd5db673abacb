"""Losses: sequence-wise balance loss (formula + fp64 gradient), CE and MTP targets with masking."""

import pytest
import torch
import torch.nn.functional as F

from deepseek_model.training import (ALPHA, IGNORE_INDEX, MTP_LAMBDA, balance_loss, build_model, document_ids,
                                     forward_train, forward_train_outputs, lm_loss, mtp_loss, sequence_balance_loss,
                                     shifted_targets)


def _direct_balance_loss(scores, indices, alpha):
    """Loop-by-loop from the report: per sequence Σ_e f_e·P_e, then the mean over sequences."""
    b, t, e = scores.shape
    k = indices.shape[-1]
    total = 0.0
    for s in range(b):
        seq = 0.0
        for ex in range(e):
            count = sum(int(indices[s, i, j] == ex) for i in range(t) for j in range(k))
            f = e / (k * t) * count
            p = sum(scores[s, i, ex] / scores[s, i].sum() for i in range(t)) / t
            seq = seq + f * p
        total = total + seq
    return alpha * total / b


def _random_routing(b, t, e, k, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, t, e, generator=gen, dtype=dtype) * 0.8 + 0.1  # sigmoid-like, in (0.1, 0.9)
    indices = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(b * t)]).view(b, t, k)
    return scores, indices


def test_sequence_loss_matches_the_formula():
    scores, indices = _random_routing(3, 7, 8, 2, seed=0)
    got = sequence_balance_loss(scores, indices, ALPHA)
    want = _direct_balance_loss(scores, indices, ALPHA)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)


def test_sequence_loss_is_one_alpha_when_perfectly_balanced():
    # uniform scores and every expert chosen equally often: f_e = 1, P_e = 1/E ⇒ Σ f·P = 1.
    e, k, t = 4, 2, 6
    indices = torch.tensor([[0, 1], [2, 3]] * (t // 2)).unsqueeze(0)  # (1, T, K)
    loss = sequence_balance_loss(torch.full((1, t, e), 0.3, dtype=torch.float64), indices, alpha=0.5)
    torch.testing.assert_close(loss, torch.tensor(0.5, dtype=torch.float64))


def test_sequence_loss_gradient_matches_finite_differences():
    scores, indices = _random_routing(2, 5, 6, 3, seed=1)
    scores.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: sequence_balance_loss(s, indices, alpha=1.0), (scores,),
                                    eps=1e-6, atol=1e-9, rtol=1e-6)


def test_model_balance_loss_sums_the_layers_and_reaches_the_router(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    ids = torch.randint(0, micro_cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    out = forward_train_outputs(model, ids)
    assert [r.layer for r in out.router] == ["layers.1.ffn", "mtp.block.ffn"]
    want = 0.0
    for r in out.router:
        assert r.scores.shape[:2] == r.indices.shape[:2] == (3, 9 if r.layer == "layers.1.ffn" else 8)
        want += _direct_balance_loss(r.scores, r.indices, ALPHA)
    got = balance_loss(out.router)
    torch.testing.assert_close(got, torch.as_tensor(want, dtype=got.dtype), rtol=1e-5, atol=0)
    got.backward()
    assert model.layers[1].ffn.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no MoE routing in this forward"):
        balance_loss([])


def test_shifted_targets_are_two_ahead_and_respect_documents():
    ids = torch.arange(10, 20).unsqueeze(0)  # (1, 10)
    assert shifted_targets(ids, 2).tolist() == [list(range(12, 20))]
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    # MTP row i needs i, i+1, i+2 in one document
    want = [12, 13, IGNORE_INDEX, IGNORE_INDEX, 16, IGNORE_INDEX, IGNORE_INDEX, 19]
    assert shifted_targets(ids, 2, docs).tolist() == [want]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 1, 2, 2, 2, 3, 3, 3]]


def test_mtp_loss_targets_and_masking():
    gen = torch.Generator().manual_seed(3)
    b, t, v = 2, 9, 11
    ids = torch.randint(0, v, (b, t), generator=gen)
    logits = torch.randn(b, t - 1, v, generator=gen)
    # no documents: rows 0..T-3 predict ids[:, i+2]; the last row has no target
    want = F.cross_entropy(logits[:, : t - 2].reshape(-1, v), ids[:, 2:].reshape(-1))
    torch.testing.assert_close(mtp_loss(logits, ids), MTP_LAMBDA * want)
    # packed documents given by position ids: row 0 has a boundary at 5, row 1 at 2 and 7
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4, 0, 1]])
    rows = []
    for s in range(b):
        for i in range(t - 2):
            if pos[s, i + 1] != 0 and pos[s, i + 2] != 0:  # i, i+1, i+2 in one document
                rows.append((s, i))
    want = torch.stack([F.cross_entropy(logits[s, i], ids[s, i + 2]) for s, i in rows]).mean()
    torch.testing.assert_close(mtp_loss(logits, ids, position_ids=pos, lam=1.0), want)
    # changing a masked row's logits does not change the loss
    masked = logits.clone()
    masked[0, 3] += 100.0  # row 0, i=3: target at 5 is in the next document
    masked[:, t - 2] += 100.0  # the last row never has a target
    torch.testing.assert_close(mtp_loss(masked, ids, position_ids=pos, lam=1.0), want)


def test_lm_loss_ignores_document_boundaries():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 7, (1, 6), generator=gen)
    logits = torch.randn(1, 6, 7, generator=gen)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    keep = [0, 1, 3, 4]  # position 2 would predict the next document's first token
    want = F.cross_entropy(logits[0, keep], ids[0, [k + 1 for k in keep]])
    torch.testing.assert_close(lm_loss(logits, ids, docs), want)


def test_forward_train_matches_the_inference_entry_points(micro_cfg):
    model = build_model(micro_cfg, seed=5).eval()
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(5))
    logits, mtp = forward_train(model, ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids), rtol=0, atol=0)
        torch.testing.assert_close(mtp, model.mtp_logits(ids), rtol=0, atol=0)
