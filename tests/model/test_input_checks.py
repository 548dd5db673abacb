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
