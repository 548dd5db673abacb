"""The tiny tokenizer written by make_tiny_checkpoint: loads with `tokenizers` and transformers,
round-trips text, DeepSeek special ids, chat template, and text prompts through generate()."""

import json
import os

import pytest

import deepseek_model as dsm
from deepseek_model.tokenizer import ASSISTANT_TOKEN, BOS_TOKEN, USER_TOKEN
from deepseek_model.tokenizer import load_tokenizer

TEXT = "Hello world! The capital of France is Paris. ünïcode 日本"


def test_files_and_ids(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    assert os.path.isfile(os.path.join(tiny_ckpt, "tokenizer.json"))
    cfg = json.load(open(os.path.join(tiny_ckpt, "tokenizer_config.json"), encoding="utf-8"))
    assert "chat_template" in cfg
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.vocab_size <= 512
    ids = tok.encode(TEXT)
    assert ids[0] == 0 and max(ids) < 512 and len(ids) < len(TEXT.encode())  # merges compress
    assert tok.decode(ids) == TEXT


def test_chat_template(tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs)
    assert text == f"{BOS_TOKEN}Be brief.{USER_TOKEN}Hi{ASSISTANT_TOKEN}"
    ids = tok.encode_chat(msgs)
    assert ids[0] == 0 and ids.count(0) == 1 and tok.token_to_id(USER_TOKEN) in ids
    assert ids[-1] == tok.token_to_id(ASSISTANT_TOKEN)


def test_same_as_transformers(tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_ckpt)
    tok = load_tokenizer(tiny_ckpt)
    assert hf(TEXT).input_ids == tok.encode(TEXT)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(msgs)


def test_text_prompts_in_generate(model, tiny_ckpt):
    tok = load_tokenizer(tiny_ckpt)
    res = dsm.generate(model, ["Hello", "The capital of France"], max_new_tokens=5, eos=[], tokenizer=tok)
    ids = dsm.generate(model, [tok.encode("Hello"), tok.encode("The capital of France")], max_new_tokens=5, eos=[])
    assert res.tokens == ids.tokens
    chat = dsm.generate(model, "Hi", max_new_tokens=3, eos=[], tokenizer=tok, chat=True)
    assert chat.tokens == dsm.generate(model, [tok.encode_chat([{"role": "user", "content": "Hi"}])],
                                       max_new_tokens=3, eos=[]).tokens
    with pytest.raises(ValueError, match="need a tokenizer"):
        dsm.generate(model, "Hello", max_new_tokens=2)
