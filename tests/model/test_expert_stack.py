"""Inference reads the routed experts from stacked tensors that the expert parameters view; the
stack follows the parameters whenever they stop viewing it (replaced, reassigned, converted,
deep-copied, loaded with assign=True), so the logits always equal those of a freshly loaded model
with the same weights."""

import copy

import pytest
import torch
from torch import nn

from deepseek_model.kernels import cpu_pack
from deepseek_model.loading import from_pretrained
from deepseek_model.moe import MoE


def _ids(model, bsz=2, t=9, seed=0):
    return torch.randint(0, model.cfg.vocab_size, (bsz, t), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _edit_experts(model):
    """Change two experts of the first MoE layer in place (sign flip, offset)."""
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    with torch.no_grad():
        moe.experts[3].w1.weight.mul_(-1.0)
        moe.experts[5].w2.weight.add_(0.3)


def _replace_experts(model):
    """Replace every w1 Parameter of the first MoE layer by a new (negated) one."""
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    for ex in moe.experts:
        ex.w1.weight = nn.Parameter(-ex.w1.weight.detach().clone())


@pytest.mark.parametrize("pack", [False, True])
def test_replaced_expert_parameters_are_read_after_a_forward(tiny_bf16, pack):
    if pack and not cpu_pack.available():
        pytest.skip("this torch build has no oneDNN")
    ids = _ids(from_pretrained(tiny_bf16, mtp=False))
    model = from_pretrained(tiny_bf16, mtp=False, cpu_pack=pack)
    before = _logits(model, ids)  # builds the stack (and packs it)
    _replace_experts(model)
    fresh = from_pretrained(tiny_bf16, mtp=False)
    _replace_experts(fresh)
    after = _logits(model, ids)
    assert (after - before).abs().max() > 1e-2  # the replacement matters
    torch.testing.assert_close(after, _logits(fresh, ids), rtol=1e-4, atol=1e-4)
    # one token: the few-token path checks the experts it uses
    torch.testing.assert_close(_logits(model, ids[:1, :1]), _logits(fresh, ids[:1, :1]), rtol=1e-4, atol=1e-4)


def test_load_state_dict_assign_after_a_forward(tiny_bf16):
    model = from_pretrained(tiny_bf16, mtp=False)
    ids = _ids(model)
    _logits(model, ids)
    edited = from_pretrained(tiny_bf16, mtp=False)
    _edit_experts(edited)
    state = {k: v.clone() for k, v in edited.state_dict().items()}
    model.load_state_dict(state, assign=True)
    torch.testing.assert_close(_logits(model, ids), _logits(edited, ids), rtol=0, atol=0)


def test_deep_copy_edited_in_place_and_trained(tiny_bf16):
    model = from_pretrained(tiny_bf16, mtp=False)
    ids = _ids(model)
    original = _logits(model, ids)
    twin = copy.deepcopy(model)
    _edit_experts(twin)
    fresh = from_pretrained(tiny_bf16, mtp=False)
    _edit_experts(fresh)
    torch.testing.assert_close(_logits(twin, ids), _logits(fresh, ids), rtol=0, atol=0)
    torch.testing.assert_close(_logits(model, ids), original, rtol=0, atol=0)  # the original is untouched
    # an optimizer step on a copy reaches its eval forward
    steps = []
    for m in (copy.deepcopy(model), from_pretrained(tiny_bf16, mtp=False)):
        m.train()
        m(ids).logsumexp(-1).mean().backward()
        m.eval()
        torch.optim.SGD([p for p in m.parameters() if p.grad is not None], lr=1.0).step()
        steps.append(_logits(m, ids))
    torch.testing.assert_close(steps[0], steps[1], rtol=0, atol=0)


def test_dtype_conversion_after_a_forward(tiny_bf16):
    model = from_pretrained(tiny_bf16, mtp=False)
    ids = _ids(model)
    _logits(model, ids)
    converted = model.to(torch.bfloat16)
    control = from_pretrained(tiny_bf16, mtp=False).to(torch.bfloat16)  # converted before any forward
    moe = next(m for m in converted.modules() if isinstance(m, MoE))
    torch.testing.assert_close(_logits(converted, ids), _logits(control, ids), rtol=0, atol=0)
    assert all(t.dtype == torch.bfloat16 for t in moe.dense_stack.tensors)


def test_stack_is_shared_not_copied(tiny_bf16):
    """After stacking, each expert's parameters are views of the stack: no weight is held twice."""
    model = from_pretrained(tiny_bf16, mtp=False)
    _logits(model, _ids(model))
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    w13, w2 = moe.dense_stack.tensors
    for i, ex in enumerate(moe.experts):
        assert ex.w1.weight.data_ptr() == w13[i].data_ptr()
        assert ex.w2.weight.data_ptr() == w2[i].data_ptr()
    assert copy.deepcopy(moe).dense_stack is None  # a copy stacks its own weights
