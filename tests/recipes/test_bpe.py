"""The recipe's byte-level BPE tokenizer: lossless, special ids, loadable by both tokenizers."""

import pytest
import torch

from deepseek_model.evaluation import token_byte_lengths
from deepseek_model.recipes.bpe import SPECIALS, train_bpe
from deepseek_model.recipes.shakespeare import load_corpus
from deepseek_model.tokenizer import BOS_TOKEN, EOS_TOKEN, Tokenizer

VOCAB = 600


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_dir):
    out = tmp_path_factory.mktemp("tok")
    corpus = load_corpus(sample_dir)
    train_bpe([p.text for p in corpus.train], VOCAB, out, 256)
    return str(out), corpus


def test_lossless_on_held_out_and_odd_text(trained):
    path, corpus = trained
    tok = Tokenizer(path)
    odd = "  two  spaces\ttab\n\n\nthree newlines, ünïcödé, emoji 🎭, \r\n CRLF, trailing   "
    for text in [p.text for p in corpus.held_out] + [odd]:
        assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_special_ids_and_vocab(trained):
    path, _ = trained
    tok = Tokenizer(path)
    assert tok.bos_id == 0 and tok.eos_id == 1
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    assert tok.vocab_size <= VOCAB
    assert tok.encode("Lear")[0] == 0 and tok.encode("Lear", add_bos=False)[0] != 0
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).startswith(BOS_TOKEN)


def test_transformers_autotokenizer_agrees(trained):
    path, corpus = trained
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(path)
    ours = Tokenizer(path)
    text = corpus.held_out[0].text[:2000]
    assert hf(text).input_ids == ours.encode(text)
    assert hf.decode(hf(text, add_special_tokens=False).input_ids) == text
    assert hf.bos_token == BOS_TOKEN and hf.eos_token == EOS_TOKEN and hf.eos_token_id == 1


def test_token_byte_lengths_count_utf8_bytes(trained):
    path, corpus = trained
    tok = Tokenizer(path)
    lengths = token_byte_lengths(tok)
    text = corpus.held_out[0].text + "ünïcödé 🎭"
    ids = tok.encode(text, add_bos=False)
    assert int(lengths[ids].sum()) == len(text.encode("utf-8"))


def test_vocab_too_small_is_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        train_bpe(["abc"], 100, tmp_path, 16)


def test_check_lossless_names_the_play(trained):
    from deepseek_model.recipes.mini_shakespeare import RecipeError, check_lossless
    from deepseek_model.recipes.shakespeare import Play

    path, corpus = trained
    tok = Tokenizer(path)
    plays = list(corpus.held_out)
    ids = [torch.tensor(tok.encode(p.text, add_bos=False)) for p in plays]
    check_lossless(tok, plays, ids)
    with pytest.raises(RecipeError, match="does not round-trip 'bad'"):
        check_lossless(tok, [Play("bad", "Lear.\n")], [torch.tensor(tok.encode("Lear!\n", add_bos=False))])
