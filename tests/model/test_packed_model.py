"""A model loaded with cpu_pack=True (oneDNN-blocked weight copies) computes what the unpacked one does."""

import copy

import pytest
import torch

from deepseek_model.attention import MLA
from deepseek_model.kernels import cpu_pack
from deepseek_model.layers import Linear, ParallelHead
from deepseek_model.loading import from_pretrained
from deepseek_model.moe import FEW_PAIRS, MoE

pytestmark = pytest.mark.skipif(not cpu_pack.available(), reason="this torch build has no oneDNN")


def _ids(bsz, t, vocab, seed=0):
    return torch.randint(0, vocab, (bsz, t), generator=torch.Generator().manual_seed(seed))


def _prefill_then_decode(model, ids, steps=3):
    """Logits of a prefill and of `steps` cached one-token steps (the few-token MoE path)."""
    out = []
    with torch.inference_mode():
        cache = model.new_cache()
        logits = model(ids, 0, cache)
        out.append(logits)
        pos = ids.shape[1]
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1)  # (B, 1)
            logits = model(nxt, pos, cache)
            out.append(logits)
            pos += 1
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_prefill_and_decode_equal_the_unpacked_model(tiny_bf16, dtype):
    plain = from_pretrained(tiny_bf16, dtype=dtype)
    packed = from_pretrained(tiny_bf16, dtype=dtype, cpu_pack=True)
    ids = _ids(2, 24, plain.cfg.vocab_size)
    assert 2 * 24 * plain.cfg.num_experts_per_tok > FEW_PAIRS  # the prefill takes the sorted-pairs path
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for a, b in zip(_prefill_then_decode(packed, ids), _prefill_then_decode(plain, ids)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_float_projection_is_packed_once(tiny_bf16, dtype):
    model = from_pretrained(tiny_bf16, dtype=dtype)
    weights = [m.weight for m in model.modules() if isinstance(m, (Linear, ParallelHead))]  # experts included
    mlas = [m for m in model.modules() if isinstance(m, MLA)]
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    nbytes = model.pack_for_cpu()
    absorbed = sum(m.wkv_b.weight.numel() * (m.wkv_b.weight.element_size() + 4) for m in mlas)  # + float32 copies
    routers = 0 if dtype == torch.float32 else sum(g.weight.numel() * 4 for g in gates)  # float32 router copies
    assert nbytes == sum(w.numel() * w.element_size() for w in weights) + absorbed + routers
    assert all((g.float_weight is None) == (dtype == torch.float32) for g in gates)
    assert all(m.absorbed.narrow_uk.dtype == torch.float32 for m in mlas)
    assert mlas and all(m.absorbed is not None for m in mlas)  # the MTP layer's attention too
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(len(m.packed_experts) == m.hi - m.lo for m in moes)
    experts = {id(lin) for m in moes for ex in m.experts for lin in (ex.w1, ex.w2, ex.w3)}
    others = [m for m in model.modules() if isinstance(m, (Linear, ParallelHead)) and id(m) not in experts]
    assert all(m.packed is not None for m in others)  # the MTP module, shared experts and head too
    assert all(ex.w1.packed is None for m in moes for ex in m.experts)  # read through the stacked copies


def test_fp8_weights_keep_their_path_and_the_rest_is_packed(tiny_fp8):
    plain = from_pretrained(tiny_fp8, dtype=torch.float32, weights="fp8")
    packed = from_pretrained(tiny_fp8, dtype=torch.float32, weights="fp8", cpu_pack=True)
    assert packed.head.packed is not None
    assert all(m.packed is None for m in packed.modules() if isinstance(m, Linear) and m.is_fp8)
    ids = _ids(1, 9, plain.cfg.vocab_size, seed=1)
    for a, b in zip(_prefill_then_decode(packed, ids, 2), _prefill_then_decode(plain, ids, 2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_packed_v32_equals_unpacked(tiny_v32):
    plain = from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16")
    packed = from_pretrained(tiny_v32, dtype=torch.float32, weights="bf16", cpu_pack=True)
    ids = _ids(1, 20, plain.cfg.vocab_size, seed=2)  # longer than index_topk: the indexer selects
    for a, b in zip(_prefill_then_decode(packed, ids), _prefill_then_decode(plain, ids)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_training_after_packing_reads_the_updated_weights(tiny_bf16):
    model = from_pretrained(tiny_bf16, dtype=torch.float32, cpu_pack=True)
    ids = _ids(1, 12, model.cfg.vocab_size, seed=3)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids).logsumexp(-1).mean().backward()  # grad mode: the packed copies are not used
    opt.step()  # in place: every packed copy is now stale
    model.eval()
    with torch.inference_mode():
        after = model(ids)
        for m in model.modules():  # the same weights, unpacked
            if isinstance(m, (Linear, ParallelHead)):
                m.packed = None
            if isinstance(m, MoE):
                m.packed_experts = None
            if isinstance(m, MLA):
                m.absorbed = None
        ref = model(ids)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)


def test_cpu_pack_is_refused_off_the_cpu_and_with_batch_invariance(tiny_bf16):
    with pytest.raises(ValueError, match="cpu_pack=True packs weights for CPU GEMMs"):
        from_pretrained(tiny_bf16, device="meta", cpu_pack=True)
    with pytest.raises(ValueError, match="cpu_pack=True and batch_invariant=True"):
        from_pretrained(tiny_bf16, cpu_pack=True, batch_invariant=True)


def test_a_deep_copy_of_a_packed_model_is_unpacked_and_equal(tiny_bf16):
    model = from_pretrained(tiny_bf16, dtype=torch.float32, cpu_pack=True)
    twin = copy.deepcopy(model)  # what the RL loop does for its reference model
    assert twin.head.packed is None and all(p == (None, None) for m in twin.modules() if isinstance(m, MoE)
                                            for p in m.packed_experts)
    assert all(m.absorbed is None for m in twin.modules() if isinstance(m, MLA))  # no stale copies carried
    ids = _ids(1, 10, model.cfg.vocab_size, seed=4)
    with torch.inference_mode():
        torch.testing.assert_close(twin(ids), model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [(1, 1), (2, 1), (1, 4), (5, 1)])
def test_narrow_per_head_products_equal_the_einsum_form(tiny_bf16, dtype, rows):
    model = from_pretrained(tiny_bf16, dtype=dtype)
    mla = model.layers[0].attn
    heads, c = mla.n_heads, mla.kv_lora_rank
    gen = torch.Generator().manual_seed(5)
    q_nope = torch.randn(*rows, heads, mla.nope, generator=gen).to(dtype)  # (B, T, H, nope)
    o_lat = torch.randn(*rows, heads, c, generator=gen).to(dtype)  # (B, T, H, c)
    with torch.inference_mode():
        ref = mla._absorb_queries(q_nope), mla._expand_values(o_lat)  # unpacked: the einsum form
        mla.pack()
        assert mla._narrow_copies() is not None  # used up to 4 rows; 5 rows take the einsum form again
        got = mla._absorb_queries(q_nope), mla._expand_values(o_lat)
    # float64 math is the referee: the float32 narrow form is exact to float32 rounding, and in
    # bfloat16 both forms are one rounding of the same float32-accumulated sums
    w = mla.wkv_b.weight.double().view(heads, mla.nope + mla.v_dim, c)  # (H, nope+v, c)
    exact = (torch.einsum("bthd,hdc->bthc", q_nope.double(), w[:, :mla.nope]),
             torch.einsum("bthc,hvc->bthv", o_lat.double(), w[:, mla.nope:]))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for g, r, e in zip(got, ref, exact):
        assert g.shape == r.shape == e.shape and g.dtype == dtype
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol)
        torch.testing.assert_close(r.double(), e, rtol=tol, atol=tol)


def test_router_copy_serves_bf16_routing_until_the_weight_changes(tiny_bf16):
    model = from_pretrained(tiny_bf16, dtype=torch.bfloat16)
    gate = next(m for m in model.modules() if isinstance(m, MoE)).gate
    x = torch.randn(3, model.cfg.hidden_size, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.inference_mode():
        ref = gate(x)
        assert gate.pack() == gate.weight.numel() * 4 and gate._weight32() is gate.float_weight.weight
        got = gate(x)
    assert torch.equal(got.indices, ref.indices) and torch.equal(got.logits, ref.logits)  # the same fp32 values
    with torch.no_grad():
        gate.weight.mul_(-1)  # in place: the copy is stale
    assert gate._weight32() is not gate.float_weight.weight
    assert copy.deepcopy(gate).float_weight is None  # a deep copy is unpacked
    with torch.inference_mode():
        torch.testing.assert_close(gate(x).logits, -ref.logits)
