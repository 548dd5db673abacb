"""batch_invariant=True: a row's logits are bit-identical alone or in a batch, prefilled at once or in
chunks, verified with or without a draft — for bf16 and FP8 checkpoints (one with odd shapes), fp32
and bf16 compute, and the bf16 / fp8 (weight-only) / w8a8 weight modes."""

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.config import builtin_config_dict
from deepseek_model.testing import make_tiny_checkpoint, one_thread

ODD = {"hidden_size": 200, "intermediate_size": 328, "moe_intermediate_size": 72}  # no 128-multiples


@pytest.fixture(scope="module")
def odd_fp8(tmp_path_factory):
    with one_thread():
        return make_tiny_checkpoint(tmp_path_factory.mktemp("odd_fp8"), {**builtin_config_dict("tiny"), **ODD},
                                    fp8=True, seed=7)


CASES = [(ckpt, dtype, weights) for ckpt in ("tiny_bf16", "tiny_fp8", "odd_fp8")
         for dtype in (torch.float32, torch.bfloat16) for weights in ("bf16", "fp8", "w8a8")]


@pytest.mark.parametrize("ckpt,dtype,weights", CASES,
                         ids=[f"{c}-{str(d).removeprefix('torch.')}-{w}" for c, d, w in CASES])
def test_rows_are_batch_invariant(request, ckpt, dtype, weights):
    path = request.getfixturevalue(ckpt)
    with one_thread():
        model = dsm.from_pretrained(path, dtype=dtype, weights=weights, batch_invariant=True)
        gen = torch.Generator().manual_seed(11)
        ids = torch.randint(2, model.cfg.vocab_size, (4, 10), generator=gen)
        with torch.no_grad():
            alone = model(ids[2:3])  # (1, T, V)
            batch = model(ids)  # (4, T, V)
            assert torch.equal(alone[0], batch[2])
            cache = model.new_cache()
            model(ids[:1, :6], 0, cache)
            chunked = model(ids[:1, 6:], 6, cache)[:, -1]  # the last position after a 6 + 4 chunked prefill
            assert torch.equal(chunked, batch[:1, -1])
        prompt = ids[1, :8].tolist()
        plain = dsm.generate(model, [prompt], max_new_tokens=64, eos=[])
        spec = dsm.generate(model, [prompt], max_new_tokens=64, eos=[], speculative="mtp", batch_invariant=True)
        assert spec.tokens == plain.tokens and spec.stats.drafted > 0


def test_generate_refuses_invariance_the_model_was_not_loaded_with(tiny_bf16):
    model = dsm.from_pretrained(tiny_bf16)
    with pytest.raises(ValueError, match="batch_invariant: the model was loaded without it"):
        dsm.generate(model, [[1, 2, 3]], max_new_tokens=2, batch_invariant=True)


@pytest.mark.parametrize("weights", ["fp8", "w8a8"])
def test_left_padded_rows_equal_the_rows_alone(tiny_fp8, weights):
    """A ragged batch (left padding, per-row positions, key masks) gives each row its lone logits."""
    with one_thread():
        model = dsm.from_pretrained(tiny_fp8, weights=weights, batch_invariant=True)
        a, b = [5, 9, 14, 3, 7, 8, 21], [40, 41, 42]
        pad = len(a) - len(b)
        ids = torch.tensor([a, [0] * pad + b])  # (2, 7)
        slots = torch.arange(len(a))
        positions = (slots - torch.tensor([[0], [pad]])).clamp_min(0)  # (2, 7)
        valid = slots >= torch.tensor([[0], [pad]])  # (2, 7)
        with torch.no_grad():
            batch = model(ids, 0, model.new_cache(), positions=positions, valid=valid)
            alone_a, alone_b = model(torch.tensor([a])), model(torch.tensor([b]))
        assert torch.equal(batch[0], alone_a[0]) and torch.equal(batch[1, pad:], alone_b[0])
        out = dsm.generate(model, [a, b], max_new_tokens=12, eos=[])
        assert out.tokens == [dsm.generate(model, [p], max_new_tokens=12, eos=[]).tokens[0] for p in (a, b)]
