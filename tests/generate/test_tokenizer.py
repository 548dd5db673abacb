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


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(10**9) %}x{% endfor %}", "loops more than 100000 times"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "loops more than"),
    ("{{ 'x' * 10**9 }}", "repeats a value to more than 1048576 items"),
    ("{{ 2 ** 100000000 }}", "raises to a power above 64"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion"),
    ("{% for m in messages %}{{ m.content * 600000 }}{% endfor %}", "repeats a value"),
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
])
def test_hostile_chat_templates_fail_fast(tmp_path, template, message):
    from deepseek_model.testing import write_tiny_tokenizer
    from deepseek_model.tokenizer import load_tokenizer

    write_tiny_tokenizer(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"^chat template: .*{message}"):
        load_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("config", [None, "without bos_token"])
def test_bos_from_the_template_without_a_configured_bos_token(tiny_ckpt, tmp_path, config):
    """A tokenizer.json alone (or a tokenizer_config.json naming no bos_token): the BOS comes from its
    TemplateProcessing post-processor, as transformers' AutoTokenizer adds it."""
    transformers = pytest.importorskip("transformers")
    import shutil

    shutil.copy(os.path.join(tiny_ckpt, "tokenizer.json"), tmp_path / "tokenizer.json")
    if config is not None:
        with open(os.path.join(tiny_ckpt, "tokenizer_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        cfg.pop("bos_token", None)
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    tok = load_tokenizer(tmp_path)
    want = transformers.AutoTokenizer.from_pretrained(str(tmp_path))(TEXT).input_ids
    assert tok.encode(TEXT) == want and want[0] == tok.token_to_id(BOS_TOKEN)
