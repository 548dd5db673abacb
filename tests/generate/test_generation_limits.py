"""Generation refuses, before allocating, what the machine cannot hold (the cache of many long rows,
the prefill mask of a long prompt, a text too long to tokenize into max_seq_len tokens), and reads
prompt files as the lines they are."""

import json
import os

import pytest
import torch

import deepseek_model as dsm
from deepseek_model import memory
from deepseek_model.cli import main as cli_main
from deepseek_model.tokenizer import load_tokenizer

LONG_CONTEXT = 1 << 24  # the largest max_position_embeddings the config check accepts


@pytest.fixture(scope="module")
def long_ckpt(tiny_bf16, tmp_path_factory):
    """The tiny checkpoint with a context of 2^24 positions (its tensors do not depend on it)."""
    out = tmp_path_factory.mktemp("long")
    for name in os.listdir(tiny_bf16):
        os.symlink(os.path.join(tiny_bf16, name), out / name)
    cfg = json.loads((out / "config.json").read_text())
    os.remove(out / "config.json")
    (out / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=LONG_CONTEXT)))
    return str(out)


@pytest.fixture(scope="module")
def long_model(long_ckpt):
    return dsm.from_pretrained(long_ckpt, dtype=torch.float32)


def test_the_cache_of_many_long_rows_is_refused_before_decoding(long_model):
    with pytest.raises(memory.InsufficientMemory, match=r"generating 1000000 tokens for 20000 prompt\(s\).*needs about"):
        dsm.generate(long_model, [[5, 6]] * 20000, max_new_tokens=10**6)


def test_the_prefill_of_a_very_long_prompt_is_refused_before_the_mask(long_model):
    with pytest.raises(memory.InsufficientMemory, match=r"prompt\(s\) of up to 300000 tokens.*needs about"):
        dsm.generate(long_model, [[5] * 300_000], max_new_tokens=1)


def test_the_estimate_counts_what_generation_holds(long_model):
    cfg = long_model.cfg
    small = memory.generation_bytes(cfg, 1, 10, 20, 4)
    assert memory.generation_bytes(cfg, 2, 10, 20, 4) == 2 * small  # linear in the rows
    assert memory.generation_bytes(cfg, 1, 10, 20, 4, cache_fp8=True) < small  # 1-byte latents
    per_token = (cfg.num_hidden_layers + cfg.num_nextn_predict_layers) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    grown = memory.generation_bytes(cfg, 1, 10, 10_020, 4) - small
    assert grown == memory.CACHE_PEAK * 10_000 * per_token  # the cache at its growth peak


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(tiny_ckpt, model):
    tok = load_tokenizer(tiny_ckpt)
    limit = model.max_seq_len * tok.max_token_bytes
    with pytest.raises(ValueError, match=rf"prompt 0 has {limit + 1} bytes of text, more than {model.max_seq_len} tokens"):
        dsm.generate(model, "a" * (limit + 1), tokenizer=tok, max_new_tokens=1)
    with pytest.raises(ValueError, match="longer than max_seq_len"):  # under the byte bound: tokenized, then counted
        dsm.generate(model, "ab " * (model.max_seq_len // 2), tokenizer=tok, max_new_tokens=1)


def test_an_allocation_failure_is_one_line_not_a_traceback(capsys, monkeypatch):
    """The last line of defence: an allocation nothing estimated (a benchmark operand, its estimate
    switched off here) ends the command with one line and exit 2."""
    from deepseek_model.benchmarks import bench_kernels

    monkeypatch.setattr(bench_kernels, "gemm_bytes", lambda args, on_gpu: 0)
    code = cli_main(["bench", "kernels", "--m", "100000000", "--trials", "1", "--threads", "1", "--quick"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: out of memory: "), err


def test_prompt_files_split_on_newlines_only_and_drop_a_byte_order_mark(tiny_ckpt, tmp_path, capsys):
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text("ROMEO.\u2028JULIET.\r\nHAMLET.\x0cOPHELIA.\n", encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    outs = []
    for path in (plain, marked):
        assert cli_main(["generate", tiny_ckpt, "--input-file", str(path), "--max-new-tokens", "3"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # the mark is not text
    tok = load_tokenizer(tiny_ckpt)
    model = dsm.from_pretrained(tiny_ckpt, dtype=torch.float32)
    want = dsm.generate(model, ["ROMEO.\u2028JULIET.", "HAMLET.\x0cOPHELIA."], tokenizer=tok, max_new_tokens=3)
    assert len(want.tokens) == 2 and all(tok.decode(t) in outs[0] for t in want.tokens)
    assert "[1] " in outs[0] and "[2] " not in outs[0]  # two prompts, not four
