"""bits_per_byte and windows name a bad argument, and take int32 windows as the model does."""

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.evaluation import bits_per_byte, token_byte_lengths, windows
from deepseek_model.pretrained import pretrained_path
from deepseek_model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def shipped():
    path = pretrained_path("mini-shakespeare")
    return dsm.from_pretrained(path, dtype=torch.float32), load_tokenizer(path)


def test_int32_windows_give_the_int64_figure(shipped):
    model, tok = shipped
    lengths = token_byte_lengths(tok)
    wins = windows([tok.encode("MACBETH. So foul and fair a day I have not seen.")], 16)
    want = bits_per_byte(model, wins, lengths)
    got = bits_per_byte(model, [w.to(torch.int32) for w in wins], lengths)
    assert (got.nll_nats, got.tokens, got.bytes) == (want.nll_nats, want.tokens, want.bytes)


@pytest.mark.parametrize("call, needle", [
    (lambda m, tok, lengths: windows([[1, 2, 3]], 8.0), "context must be an integer >= 2, got 8.0"),
    (lambda m, tok, lengths: bits_per_byte(m, windows([[1, 2, 3]], 4), lengths, batch=0),
     "batch must be an integer >= 1, got 0"),
    (lambda m, tok, lengths: bits_per_byte(m, windows([[1, 2, 300]], 4), lengths[:100]),
     "byte_lengths: covers token ids [0, 100), a window holds 300"),
])
def test_bad_arguments_name_themselves(shipped, call, needle):
    model, tok = shipped
    with pytest.raises(ValueError) as e:
        call(model, tok, token_byte_lengths(tok))
    assert needle in str(e.value)
