"""The training loop, its checkpoints (reloaded by from_pretrained) and the `train` command."""

import json
import math

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.cli import main as cli_main
from deepseek_model.training import TrainConfig, build_model, save_checkpoint, train
from deepseek_model.training_data import ByteCorpus, SyntheticCorpus


def test_loss_decreases_and_biases_move(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    records = []
    result = train(model, SyntheticCorpus(micro_cfg.vocab_size, seed=0),
                   TrainConfig(steps=30, batch_size=4, seq_len=16, gamma=1e-3, warmup=5, log_every=10),
                   log=records.append)
    assert [r["step"] for r in records] == [0, 10, 20, 29]
    h = result.history
    assert len(h) == 30
    first, last = h[0]["lm_loss"], sum(r["lm_loss"] for r in h[-5:]) / 5
    assert last < 0.8 * first
    assert result.eval_loss < first and result.eval_mtp_loss < math.log(micro_cfg.vocab_size)  # below a uniform guess
    assert set(h[-1]["load"]) == {"layers.1.ffn", "mtp.block.ffn"}
    bias = model.layers[1].ffn.gate.bias
    assert 0 < bias.abs().max() <= 30 * 1e-3 + 1e-6  # |Δ| = γ per step at most


def test_micro_batches_and_fp8_loop_run(micro_cfg):
    tc = TrainConfig(steps=3, batch_size=2, seq_len=12, micro_batches=2, warmup=1)
    fp8 = train(build_model(micro_cfg, seed=1, fp8=True), SyntheticCorpus(micro_cfg.vocab_size, seed=1), tc)
    ref = train(build_model(micro_cfg, seed=1), SyntheticCorpus(micro_cfg.vocab_size, seed=1), tc)  # fp32
    for a, b in zip(fp8.history, ref.history):  # same init and batches: FP8 emulation stays near fp32
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02)


def test_checkpoint_reloads_with_identical_logits(micro_cfg, tmp_path):
    model = build_model(micro_cfg, seed=2)
    train(model, SyntheticCorpus(micro_cfg.vocab_size, seed=2), TrainConfig(steps=3, batch_size=2, seq_len=12,
                                                                            gamma=0.05, warmup=1))
    model.eval()
    assert model.layers[1].ffn.gate.bias.abs().sum() > 0  # the trained biases are part of the checkpoint
    path = save_checkpoint(model, tmp_path / "ckpt")
    loaded = dsm.from_pretrained(path, dtype=torch.float32, attn="naive")
    ids = torch.randint(0, micro_cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
        torch.testing.assert_close(loaded.mtp_logits(ids), model.mtp_logits(ids), rtol=0, atol=0)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and "quantization_config" not in cfg
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in index["weight_map"]
    assert "model.layers.2.shared_head.head.weight" in index["weight_map"]  # MTP copy of the tied head


def test_byte_corpus(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"hello world\n" * 3)
    b = ByteCorpus(path, 512).sample(3, 20, torch.Generator().manual_seed(0))
    assert b.ids.shape == (3, 20) and int(b.ids.max()) < 256


def test_train_command(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out, log = tmp_path / "out", tmp_path / "run.json"
    code = cli_main(["train", "--config", "tiny", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                     "--log-every", "1", "--text", str(text), "--out", str(out), "--json", str(log),
                     "--save-dtype", "bf16"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "step     2/2" in printed and "load max/mean" in printed
    run = json.loads(log.read_text())
    assert len(run["history"]) == 2 and "cv" in run["history"][0]
    model = dsm.from_pretrained(out)
    assert model.cfg.num_hidden_layers == 3
    assert cli_main(["train", "--steps", "0"]) == 2  # one-line error, non-zero exit


@pytest.mark.parametrize("args, message", [
    (["--steps", "1", "--lr", "nan"], "--lr must be a positive number, got nan"),
    (["--steps", "1", "--lr", "-1"], "--lr must be a positive number, got -1"),
    (["--steps", "1", "--gamma", "nan"], "--gamma must be a non-negative number, got nan"),
    (["--steps", "1", "--mtp-lambda", "-0.5"], "--mtp-lambda must be a non-negative number, got -0.5"),
    (["--recipe", "mini-shakespeare", "--lr", "nan"], "--lr must be a positive number, got nan"),
])
def test_bad_rates_are_one_line_errors_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert cli_main(["train", *args, "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == f"error: {message}" and not out.exists()


def test_bias_update_lowers_the_expert_load_imbalance(micro_cfg):
    # Same seed, same batches: the Zipf-skewed corpus drives the router to imbalance without γ.
    def final_load(gamma):
        model = build_model(micro_cfg, seed=0)
        h = train(model, SyntheticCorpus(micro_cfg.vocab_size, seed=0),
                  TrainConfig(steps=60, batch_size=4, seq_len=32, gamma=gamma)).history
        return sum(r["max_over_mean"] for r in h[-10:]) / 10, sum(r["lm_loss"] for r in h[-10:]) / 10, h[0]

    unbalanced, loss0, first = final_load(0.0)
    balanced, loss1, _ = final_load(0.02)
    assert unbalanced > first["max_over_mean"]  # imbalance grows when nothing counters it
    assert balanced < 0.7 * unbalanced
    assert max(loss0, loss1) < 0.5 * first["lm_loss"]
