"""train_step at its edges: micro-batches that add up to the large batch (documents included), a
diverged step that stops with a clear error and leaves the weights alone, and configurations too
short to have targets refused up front."""

import copy

import pytest
import torch

from deepseek_model.cli import main as cli_main
from deepseek_model.training import (BiasUpdater, TrainConfig, TrainingDiverged, build_model, make_optimizer, train,
                                     train_step)
from deepseek_model.training_data import Batch, SyntheticCorpus


class FixedRows:
    """A corpus that hands out the rows of one fixed batch in order (the same sequences however
    they are grouped into micro-batches)."""

    def __init__(self, batch: Batch):
        self.batch, self.next = batch, 0

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> Batch:
        rows = slice(self.next, self.next + batch)
        self.next += batch
        return Batch(self.batch.ids[rows, :seq_len], self.batch.doc_ids[rows, :seq_len])


def _step_grads(model, corpus, tc):
    """The step record and every parameter's gradient just before the optimizer update."""
    opt = make_optimizer(model, tc)
    grads = {}
    real_step = opt.step

    def capture(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    opt.step = capture
    rec = train_step(model, opt, BiasUpdater(model, 0.0), corpus, tc, 0, torch.Generator().manual_seed(0))
    return rec, grads


def test_micro_batches_add_up_to_the_large_batch_across_documents(micro_cfg):
    batch = SyntheticCorpus(micro_cfg.vocab_size, seed=3).sample(8, 24, torch.Generator().manual_seed(5))
    assert len({int((d[1:] != d[:-1]).sum()) for d in batch.doc_ids}) > 1  # rows hold different numbers of documents
    base = build_model(micro_cfg, seed=0)
    runs = {}
    for micro in (1, 2, 8):
        tc = TrainConfig(steps=1, batch_size=8 // micro, seq_len=24, micro_batches=micro, grad_clip=1e9, gamma=0.0)
        runs[micro] = _step_grads(copy.deepcopy(base), FixedRows(batch), tc)
    (rec1, g1) = runs[1]
    for micro in (2, 8):
        rec, g = runs[micro]
        for key in ("lm_loss", "mtp_loss", "loss"):
            assert rec[key] == pytest.approx(rec1[key], rel=1e-5), (micro, key)
        assert rec["grad_norm"] == pytest.approx(rec1["grad_norm"], rel=1e-4)
        worst = max(((g[n] - g1[n]).abs().max() / g1[n].abs().max().clamp_min(1e-12)).item() for n in g1)
        assert worst < 1e-3, (micro, worst)


def test_a_diverged_step_raises_and_leaves_the_weights(micro_cfg):
    model = build_model(micro_cfg, seed=0)
    tc = TrainConfig(steps=4, batch_size=2, seq_len=8, lr=1e30, warmup=0)
    with pytest.raises(TrainingDiverged, match=r"step \d: the (loss|gradient norm) is (nan|inf).*training diverged"):
        train(model, SyntheticCorpus(micro_cfg.vocab_size), tc)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_the_train_command_saves_nothing_from_a_diverged_run(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--config", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "8", "--lr", "1e30",
                     "--threads", "1", "--out", str(out)])
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "training diverged" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("changes, needle", [
    (dict(seq_len=1), "tc.seq_len must be >= 3 (MTP targets are two ahead), got 1"),
    (dict(seq_len=2), "tc.seq_len must be >= 3"),
    (dict(batch_size=0), "tc.batch_size must be >= 1, got 0"),
    (dict(micro_batches=0), "tc.micro_batches must be >= 1, got 0"),
])
def test_configurations_without_targets_are_refused(micro_cfg, changes, needle):
    model = build_model(micro_cfg, seed=0)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        train(model, SyntheticCorpus(micro_cfg.vocab_size), TrainConfig(**{"steps": 1, "batch_size": 2, **changes}))


def test_a_batch_beyond_memory_is_refused_before_training(tmp_path, capsys):
    code = cli_main(["train", "--config", "tiny", "--steps", "1", "--batch-size", "100000", "--seq-len", "64",
                     "--threads", "1", "--out", str(tmp_path / "run")])
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(err) == 1
    assert "training with micro-batches of 100000 x 64 tokens" in err[0] and "needs about" in err[0]
    assert not (tmp_path / "run").exists()
