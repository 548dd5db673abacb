"""Bad input_ids / positions are refused with one ValueError naming them, before any cache slot is written."""

import pytest
import torch

from deepseek_model.loading import from_pretrained


@pytest.fixture(scope="module")
def model(tiny_bf16):
    return from_pretrained(tiny_bf16, dtype=torch.float32)


@pytest.mark.parametrize("ids, start, needle", [
    (torch.zeros(1, 0, dtype=torch.long), 0, r"input_ids is empty \(shape \(1, 0\)\)"),
    (torch.zeros(0, 3, dtype=torch.long), 0, r"input_ids is empty \(shape \(0, 3\)\)"),
    (torch.zeros(3, dtype=torch.long), 0, r"input_ids must be \(batch, seq\), got shape \(3,\)"),
    (torch.zeros(1, 3), 0, "input_ids must be integer token ids, got torch.float32"),
    (torch.tensor([[1, -1]]), 0, r"outside \[0, vocab_size=512\)"),
    (torch.tensor([[1, 512]]), 0, r"outside \[0, vocab_size=512\)"),
    (torch.tensor([[1, 2]]), -1, r"positions \[-1, 1\) exceed max_seq_len"),
])
def test_bad_input_ids_are_refused_and_the_cache_is_untouched(model, ids, start, needle):
    cache = model.new_cache()
    with torch.inference_mode():
        model(torch.tensor([[5, 6, 7]]), 0, cache)
        before = [layer.kv[:, :3].clone() for layer in cache.layers if layer.kv is not None]
        for call in (lambda: model(ids, start if start else 3, cache), lambda: model.hidden(ids, start, None)):
            with pytest.raises(ValueError, match=needle):
                call()
    assert all(c.length == 3 for c in cache.layers if c.kv is not None)
    after = [layer.kv[:, :3] for layer in cache.layers if layer.kv is not None]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_positions_past_max_seq_len_are_refused(model):
    with pytest.raises(ValueError, match=f"exceed max_seq_len {model.max_seq_len}"):
        model(torch.tensor([[1, 2]]), model.max_seq_len - 1, model.new_cache())


def test_a_cache_of_another_model_is_refused(tiny_bf16, tiny_v32, model, tmp_path):
    """A cache remembers what the model that made it caches; another model's is one ValueError,
    not an IndexError, a shape error deep inside, or silently wrong logits."""
    from deepseek_model.config import builtin_config_dict
    from deepseek_model.testing import make_tiny_checkpoint

    deeper = make_tiny_checkpoint(tmp_path / "deep", dict(builtin_config_dict("tiny"), num_hidden_layers=4), seed=0)
    ids = torch.tensor([[5, 6, 7]])
    for other in (from_pretrained(deeper, dtype=torch.float32), from_pretrained(tiny_v32, dtype=torch.float32,
                                                                               weights="bf16")):
        cache = other.new_cache()
        with torch.inference_mode():
            other(ids, 0, cache)
            with pytest.raises(ValueError, match=r"cache: made for a model that caches .* this one caches"):
                model(ids[:, :1], 3, cache)
    with pytest.raises(ValueError, match="cache must be a Cache from model.new_cache"):
        model(ids, 0, [None])
    with pytest.raises(ValueError, match="fp8 must be True or False, got 'no'"):
        model.new_cache(fp8="no")


def test_mtp_step_checks_its_arguments(model):
    cache = model.new_cache()
    h = torch.zeros(1, 2, model.cfg.hidden_size)
    with torch.inference_mode():
        for kwargs, needle in [
            (dict(cache=None), "cache: mtp_step needs a cache with an MTP layer"),
            (dict(next_ids=torch.tensor([[1, 512]])), r"outside \[0, vocab_size=512\)"),
            (dict(next_ids=torch.tensor([[1.0, 2.0]])), "must be integer token ids"),
            (dict(next_ids=torch.tensor([[1, 2, 3]])), r"next_ids must be \(batch, seq\) = \(1, 2\)"),
            (dict(h=torch.zeros(1, 2, 7)), r"h must be \(batch, seq, hidden_size=256\)"),
        ]:
            args = {**dict(h=h, next_ids=torch.tensor([[1, 2]]), start_pos=0, cache=cache), **kwargs}
            with pytest.raises(ValueError, match=needle):
                model.mtp_step(**args)


def test_to_bfloat16_keeps_the_float32_buffers(tiny_bf16):
    """model.to(torch.bfloat16) computes what a model loaded in bfloat16 does: the rotary frequencies
    and the routers' correction biases stay float32 (in bfloat16 they moved the logits by 0.46)."""
    converted = from_pretrained(tiny_bf16, dtype=torch.float32).to(torch.bfloat16)
    loaded = from_pretrained(tiny_bf16, dtype=torch.bfloat16)
    assert converted.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids), loaded(ids), rtol=0, atol=0)


@pytest.mark.parametrize("call, needle", [
    (lambda m: m(torch.tensor([[1, 2]]), 0.0), "start_pos must be an integer, got 0.0"),
    (lambda m: m([[1, 2]]), "input_ids must be a (batch, seq) integer tensor, got list"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=torch.tensor([[0.0, 0.5]])),
     "positions must be an integer tensor of shape (1, 2), got torch.float32"),
    (lambda m: m(torch.tensor([[1, 2]]), positions=[[0, 1]]), "positions must be an integer tensor"),
    (lambda m: m(torch.tensor([[1, 2]]), valid=[[True, True]]), "valid must be a bool tensor of shape (1, 2)"),
    (lambda m: m(torch.tensor([[1, 2]]), outputs="router"), "outputs must be a set of names, e.g. {'router'}"),
])
def test_bad_forward_arguments_name_themselves(model, call, needle):
    with torch.inference_mode(), pytest.raises(ValueError) as e:
        call(model)
    assert needle in str(e.value) and "\n" not in str(e.value)
