"""The mini-shakespeare recipe on the shipped sample: it learns, exports the FP8 layout, resumes exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import deepseek_model as dsm
from deepseek_model.recipes.mini_shakespeare import (BF16_DIR, CHECKPOINT_DIR, LOG_FILE, STATE_FILE, Recipe,
                                                     RecipeError, TokenCorpus, run_recipe)

FAST = dict(steps=6, batch_size=2, warmup=1, lr=3e-3, eval_every=3, eval_windows=2, save_every=2)


def _quiet(**kw):
    return dict(threads=1, quiet=True, say=lambda s: None, **kw)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, sample_dir):
    out = str(tmp_path_factory.mktemp("run") / "out")
    log = run_recipe(out, Recipe(**FAST), corpus=sample_dir, **_quiet())
    return out, log


def test_a_few_steps_lower_the_loss(full_run):
    out, log = full_run
    h = log["history"]
    assert len(h) == 6 and log["completed"]
    assert h[0]["lm_loss"] > 7.5  # ~ln(vocab) at initialisation
    assert h[-1]["lm_loss"] < h[0]["lm_loss"] - 0.5
    assert [e["step"] for e in log["evals"]] == [3, 6]
    assert log["held_out"]["plays"] == ["hamlet"]
    assert log["held_out"]["bits_per_byte"] < log["evals"][0]["bits_per_byte"] + 1e-9 or \
        log["held_out"]["loss"] < h[0]["lm_loss"]
    with open(os.path.join(out, LOG_FILE), encoding="utf-8") as f:
        assert json.load(f)["steps_done"] == 6
    for name in ("train_loss.png", "expert_load.png"):
        assert os.path.getsize(os.path.join(out, name)) > 1000


def test_export_is_the_published_fp8_layout(full_run):
    out, _ = full_run
    ckpt = os.path.join(out, CHECKPOINT_DIR)
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": [128, 128]}
    assert config["max_position_embeddings"] == 256
    with open(os.path.join(ckpt, "model.safetensors.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    mtp = config["num_hidden_layers"]
    dtypes = {}
    for name, fname in weight_map.items():
        with safe_open(os.path.join(ckpt, fname), "pt") as f:
            dtypes[name] = f.get_slice(name).get_dtype()
    q = "model.layers.1.self_attn.q_b_proj.weight"
    assert dtypes[q] == "F8_E4M3" and dtypes[q + "_scale_inv"].startswith("F32")
    assert dtypes["model.layers.1.mlp.experts.7.down_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.gate.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == "BF16" and dtypes["lm_head.weight"] == "BF16"
    assert f"model.layers.{mtp}.eh_proj.weight" in weight_map  # the MTP layer in the published position
    assert f"model.layers.{mtp}.mlp.experts.0.up_proj.weight_scale_inv" in weight_map
    assert f"model.layers.{mtp}.embed_tokens.weight" not in weight_map  # stored once, shared on load
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(ckpt, f)) and os.path.isfile(os.path.join(out, BF16_DIR, f))


def test_export_reloads_with_the_trained_numbers(full_run, sample_dir):
    out, log = full_run
    fp8 = dsm.from_pretrained(os.path.join(out, CHECKPOINT_DIR), weights="bf16")
    bf16 = dsm.from_pretrained(os.path.join(out, BF16_DIR))
    assert fp8.has_mtp and bf16.has_mtp
    ids = torch.arange(4, 68).unsqueeze(0)
    a, b = fp8(ids), bf16(ids)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 0.1  # FP8 rounding (e4m3: ~3 % per weight): small, never zero
    m_a, m_b = fp8.mtp_logits(ids), bf16.mtp_logits(ids)
    assert ((m_a - m_b).norm() / m_b.norm()).item() < 0.05


def test_resume_after_a_time_limit_equals_an_uninterrupted_run(full_run, tmp_path, sample_dir):
    out_a, _ = full_run
    out_b = str(tmp_path / "b")
    log = run_recipe(out_b, Recipe(**FAST), corpus=sample_dir, minutes=1e-9, export=False, **_quiet())
    assert not log["completed"] and log["steps_done"] == 1
    log = run_recipe(out_b, Recipe(**FAST), corpus=sample_dir, resume=True, export=False, **_quiet())
    assert log["completed"] and log["steps_done"] == 6
    a = torch.load(os.path.join(out_a, STATE_FILE), weights_only=True)
    b = torch.load(os.path.join(out_b, STATE_FILE), weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    assert json.loads(a["history"])[-1]["loss"] == json.loads(b["history"])[-1]["loss"]


def test_bad_arguments(tmp_path, sample_dir, full_run):
    for minutes in (0, -1, float("nan")):
        with pytest.raises(RecipeError, match="--minutes must be a positive number"):
            run_recipe(str(tmp_path / "x"), Recipe(**FAST), corpus=sample_dir, minutes=minutes, **_quiet())
    with pytest.raises(RecipeError, match="not an empty directory"):
        run_recipe(full_run[0], Recipe(**FAST), corpus=sample_dir, **_quiet())
    with pytest.raises(RecipeError, match="no train_state.pt to resume from"):
        run_recipe(str(tmp_path / "new"), Recipe(**FAST), corpus=sample_dir, resume=True, **_quiet())
    with pytest.raises(RecipeError, match=r"different recipe settings \(steps\)"):
        run_recipe(full_run[0], Recipe(**{**FAST, "steps": 7}), corpus=sample_dir, resume=True, **_quiet())
    assert not (tmp_path / "x").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize("minutes", ["0", "-2"])
def test_cli_minutes_must_be_positive(tmp_path, minutes, sample_dir):
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "train", "--recipe", "mini-shakespeare",
                        "--corpus", sample_dir, "--out", str(tmp_path / "o"), f"--minutes={minutes}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == f"error: --minutes must be a positive number, got {minutes}"


def test_token_corpus_windows_stay_inside_documents():
    docs = [torch.arange(0, 10), torch.arange(100, 103), torch.arange(200, 230)]
    corpus = TokenCorpus(docs, 256)
    gen = torch.Generator().manual_seed(0)
    b = corpus.sample(64, 8, gen)
    assert b.ids.shape == (64, 8)
    for row in b.ids:
        assert (row[1:] - row[:-1] == 1).all()  # contiguous: never across a document boundary
        assert int(row[0]) < 100 or int(row[0]) >= 200  # the 3-token document cannot hold a window
    with pytest.raises(RecipeError, match="shorter than the context"):
        corpus.sample(1, 64, gen)


def test_cli_recipe_run_with_overrides(tmp_path, sample_dir):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "train", "--recipe", "mini-shakespeare",
                        "--corpus", sample_dir, "--out", str(out), "--steps", "2", "--batch-size", "1", "--gamma", "0.01",
                        "--lr", "3e-3", "--threads", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    log = json.loads((out / LOG_FILE).read_text())
    assert log["recipe"]["steps"] == 2 and log["recipe"]["batch_size"] == 1 and log["recipe"]["gamma"] == 0.01
    assert log["recipe"]["lr"] == 3e-3  # the plain run's default value, given: an override, not ignored
    assert log["steps_done"] == 2 and (out / CHECKPOINT_DIR / "config.json").is_file()
    assert "held-out bits/byte" in r.stdout


@pytest.mark.parametrize("extra, message", [(["--text", "x.txt"], "--text does not apply to --recipe runs"),
                                            (["--gamma", "-1"], "--gamma must be a non-negative number, got -1"),
                                            (["--lr", "0"], "--lr must be a positive number, got 0"),
                                            (["--config", "tiny"], "--config does not apply to --recipe runs"),
                                            (["--seq-len", "64"], "--seq-len does not apply to --recipe runs"),
                                            (["--save-dtype", "fp32"], "--save-dtype does not apply to --recipe runs")])
def test_cli_recipe_refuses_options(tmp_path, sample_dir, extra, message):
    r = subprocess.run([sys.executable, "-m", "deepseek_model.cli", "train", "--recipe", "mini-shakespeare",
                        "--corpus", sample_dir, "--out", str(tmp_path / "o")] + extra,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {message}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
