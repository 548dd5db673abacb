"""The arithmetic recipe: DeepSeek-R1-Zero in miniature on verifiable additions, on a CPU.

A character-level tokenizer (the four tags `<think>`, `</think>`, `<answer>`, `</answer>` are one
token each), a small V3-style model (MLA, MoE with 4 routed experts + 1 shared, sigmoid routing
with the correction bias, one MTP layer), a brief supervised pretraining, then GRPO with the rule
rewards (accuracy + 0.1·format) against a frozen copy of the pretrained model.

The supervised examples come in two styles, like a base model that has seen both worked solutions
and bare answers: with probability `reasoning_fraction` (0.35) the column sums, right to left,

    47+38=<think>7+8=15 4+3+1=8</think><answer>85</answer>

otherwise an empty think and the answer directly, `47+38=<think></think><answer>85</answer>`.
After pretraining the model mostly answers directly (greedy picks the more frequent style), which
is usually wrong; when it does write the column sums it is right far more often. GRPO has to discover
from the rewards alone that reasoning pays: pass@1 and the response length rise together, as in
R1-Zero. Held-out problems (pairs never seen in pretraining nor in GRPO) measure greedy pass@1
before and after. `control="shuffled"` runs the same GRPO with the rewards permuted within each
batch: the control that separates learning from the reward from the effect of training further.

Everything is seeded per step, so a run resumed from its saved state continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from tqdm import tqdm

from deepseek_model import plotting
from deepseek_model.config import ModelConfig
from deepseek_model.rl.loop import CONTROLS, GRPOConfig, GRPOTrainer, greedy_pass_at_1
from deepseek_model.rl.rewards import accuracy_reward, format_reward, rule_reward
from deepseek_model.training import BiasUpdater, TrainConfig, build_model, make_optimizer, train_step
from deepseek_model.training_data import Batch
from deepseek_model.recipes import check_run_dir

RECIPE_NAME = "arithmetic"
STATE_FILE = "rl_state.pt"
LOG_FILE = "rl_log.json"
PLOT_FILE = "rl_curves.png"
SEED_STRIDE = 1_000_003  # generator of step s of a phase: seed · SEED_STRIDE + offset + s
GRPO_OFFSET = 500_000  # GRPO steps draw from generators apart from pretraining's
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
CHARS = "0123456789+= "
BOS, EOS = 0, 1

CONTEXT = 64  # max_position_embeddings: the longest 3-digit example is 42 tokens
VOCAB = 32  # ids in use: 2 + 4 tags + 13 characters, rounded up


def config_dict() -> dict[str, Any]:
    """The model's HF config dict (a fresh copy): DeepSeek-V3 in miniature — MLA with q/kv low rank
    and decoupled RoPE, DeepSeekMoE with sigmoid scores, the correction bias (noaux_tc) and
    top-2 of 4 routed experts plus 1 shared expert, one MTP module."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": VOCAB, "hidden_size": 96, "intermediate_size": 192, "moe_intermediate_size": 96,
        "num_hidden_layers": 2, "num_nextn_predict_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
        "n_shared_experts": 1, "n_routed_experts": 4, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 32, "q_lora_rank": 64, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "moe_layer_freq": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": CONTEXT, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "bos_token_id": BOS,
        "eos_token_id": EOS, "tie_word_embeddings": False, "rope_theta": 10000, "rope_scaling": None,
        "attention_bias": False, "torch_dtype": "float32",
    }


class RecipeError(ValueError):
    """Bad recipe arguments or output directory."""


class CharTokenizer:
    """Character-level tokenizer: BOS 0, EOS 1, the four tags, then one id per character of CHARS."""

    def __init__(self) -> None:
        self.pieces = ["<bos>", "<eos>", *TAGS, *CHARS]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.bos, self.eos = BOS, EOS

    @property
    def vocab_size(self) -> int:
        """Number of ids in use."""
        return len(self.pieces)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (tags first, then single characters); ValueError on a character outside CHARS."""
        out, i = [], 0
        while i < len(text):
            tag = next((t for t in TAGS if text.startswith(t, i)), None)
            if tag is not None:
                out.append(self.ids[tag])
                i += len(tag)
                continue
            if text[i] not in self.ids or text[i] in ("<", ">"):
                raise ValueError(f"text: character {text[i]!r} is not in the arithmetic alphabet {CHARS!r}")
            out.append(self.ids[text[i]])
            i += 1
        return out

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (BOS/EOS are dropped)."""
        return "".join(self.pieces[i] for i in ids if i not in (BOS, EOS) and 0 <= i < len(self.pieces))


@dataclass(frozen=True)
class Problem:
    """a + b."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        """The question, e.g. '47+38='."""
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        """The reference answer, e.g. '85'."""
        return str(self.a + self.b)

    def solution(self, digits: int, reason: bool = True) -> str:
        """The supervised completion: column sums right to left, then the answer (reason=False: an
        empty `<think></think>` and the answer directly)."""
        if not reason:
            return f"<think></think><answer>{self.answer}</answer>"
        x, y = str(self.a).zfill(digits)[::-1], str(self.b).zfill(digits)[::-1]
        carry, steps = 0, []
        for dx, dy in zip(x, y):
            s = int(dx) + int(dy) + carry
            steps.append(f"{dx}+{dy}{'+1' if carry else ''}={s}")
            carry = s // 10
        return f"<think>{' '.join(steps)}</think><answer>{self.answer}</answer>"


def split_problems(digits: int, held_out: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): every pair of numbers below 10^digits, shuffled by seed."""
    n = 10 ** digits
    pairs = [Problem(a, b) for a in range(n) for b in range(n)]
    random.Random(seed).shuffle(pairs)
    if not 0 < held_out < len(pairs):
        raise RecipeError(f"held_out must be in [1, {len(pairs) - 1}], got {held_out}")
    return pairs[held_out:], pairs[:held_out]


class ArithmeticCorpus:
    """Packed supervised sequences of formatted examples (BOS prompt solution EOS), one document each.

    Args:
        problems: the training problems.
        tok: the tokenizer.
        digits: digits per operand (the column-sum width).
        reasoning_fraction: probability that an example shows its column sums (else an empty think).
    """

    def __init__(self, problems: list[Problem], tok: CharTokenizer, digits: int, reasoning_fraction: float = 1.0):
        self.problems, self.tok, self.digits = problems, tok, digits
        self.reasoning_fraction = reasoning_fraction
        self.vocab_size = VOCAB

    def example(self, p: Problem, reason: bool = True) -> list[int]:
        """Token ids of one example."""
        return [BOS, *self.tok.encode(p.prompt + p.solution(self.digits, reason)), EOS]

    def sample(self, batch: int, seq_len: int, gen: torch.Generator) -> Batch:
        """`batch` rows of `seq_len` tokens, examples packed back to back (doc ids mark them)."""
        ids = torch.zeros(batch, seq_len, dtype=torch.int64)  # (B, T)
        docs = torch.zeros(batch, seq_len, dtype=torch.int64)  # (B, T)
        for r in range(batch):
            row, doc = [], []
            while len(row) < seq_len:
                p = self.problems[int(torch.randint(len(self.problems), (1,), generator=gen))]
                reason = bool(torch.rand((), generator=gen) < self.reasoning_fraction)
                ex = self.example(p, reason)
                doc += [len(set(doc))] * len(ex)
                row += ex
            ids[r] = torch.tensor(row[:seq_len])
            docs[r] = torch.tensor(doc[:seq_len])
        return Batch(ids, docs)


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of the recipe (the defaults are the recorded run)."""

    digits: int = 2  # digits per operand
    held_out: int = 500  # held-out problems (never trained on) for pass@1
    pretrain_steps: int = 1000  # supervised steps (chosen so held-out pass@1 starts between 10 % and 60 %)
    pretrain_batch: int = 32  # sequences per supervised step
    pretrain_lr: float = 3e-3  # peak supervised learning rate
    # share of supervised examples that show their column sums; the others answer directly after an empty
    # `<think></think>`
    reasoning_fraction: float = 0.35
    grpo_steps: int = 60  # GRPO batches
    prompts_per_step: int = 16  # prompts per GRPO batch
    group_size: int = 8  # G
    inner_steps: int = 2  # μ, updates per batch
    temperature: float = 1.0  # sampling temperature
    lr: float = 5e-5  # GRPO learning rate
    warmup: int = 10  # GRPO learning-rate warm-up steps
    clip_eps: float = 0.2  # ε
    kl_coef: float = 0.04  # β
    gamma: float = 1e-3  # router bias update speed γ (pretraining and GRPO)
    format_weight: float = 0.1  # weight of the format reward
    control: str | None = None  # None, or "shuffled" (rewards permuted within each batch)
    seed: int = 0  # everything's seed
    eval_every: int = 5  # GRPO steps between held-out evaluations
    save_every: int = 20  # steps between saved states

    def validate(self) -> None:
        """Raise a RecipeError naming the first bad field."""
        for name in ("digits", "held_out", "pretrain_batch", "grpo_steps", "prompts_per_step", "eval_every",
                     "save_every", "inner_steps"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.digits > 3:
            raise RecipeError(f"digits must be <= 3 (the context holds 64 tokens), got {self.digits}")
        if not 0.0 <= self.reasoning_fraction <= 1.0:
            raise RecipeError(f"reasoning_fraction must be in [0, 1], got {self.reasoning_fraction}")
        if self.pretrain_steps < 0:
            raise RecipeError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if self.control not in CONTROLS:
            raise RecipeError(f"control must be one of {[c for c in CONTROLS if c]} or None, got {self.control!r}")
        self.grpo_config().validate()

    def grpo_config(self) -> GRPOConfig:
        """The loop's hyper-parameters."""
        return GRPOConfig(group_size=self.group_size, max_new_tokens=max_new_tokens(self.digits),
                          temperature=self.temperature, inner_steps=self.inner_steps, clip_eps=self.clip_eps,
                          kl_coef=self.kl_coef, lr=self.lr, warmup=self.warmup, gamma=self.gamma, control=self.control)

    def train_config(self) -> TrainConfig:
        """The supervised phase's TrainConfig."""
        return TrainConfig(steps=max(1, self.pretrain_steps), batch_size=self.pretrain_batch,
                           seq_len=CONTEXT, lr=self.pretrain_lr,
                           warmup=max(1, self.pretrain_steps // 10), gamma=self.gamma, seed=self.seed)


def max_new_tokens(digits: int) -> int:
    """Room for the longest well-formed output (plus slack for the model to ramble and be cut)."""
    solution = Problem(10 ** digits - 1, 10 ** digits - 1).solution(digits)
    return len(CharTokenizer().encode(solution)) + 1 + 4  # + EOS + slack


def model_config() -> ModelConfig:
    """The recipe's architecture."""
    return ModelConfig.from_dict(config_dict(), source="recipes/arithmetic")


def reward_fn(format_weight: float) -> Callable[[str, str], float]:
    """The R1-Zero rule reward accuracy + format_weight · format."""
    return lambda completion, answer: rule_reward(completion, answer, format_weight)


def _save_state(path: str, payload: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def check_out_dir(out: str, resume: bool) -> str:
    """OUT must be new or empty, or hold a state to resume from; returns its absolute path."""
    return check_run_dir(out, resume, STATE_FILE, RecipeError)


def plot_log(log: dict[str, Any], path: str) -> str | None:
    """Reward, pass@1, KL, response length and clip fraction per GRPO step as one PNG (None without
    matplotlib)."""
    plt = plotting.pyplot(path)
    if plt is None:
        return None
    hist = [r for r in log["history"] if "skipped" not in r]
    steps = [r["step"] + 1 for r in hist]
    panels = [("reward", "mean reward (accuracy + 0.1·format)"), ("pass@1", "held-out greedy pass@1"),
              ("kl", "KL to reference (k3)"), ("response_length", "response length (tokens)"),
              ("clip_fraction", "clip fraction")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        if key == "pass@1":
            ax.plot([e["step"] for e in log["evals"]], [100 * e["pass_at_1"] for e in log["evals"]], "o-", ms=3)
            ax.set_ylabel("%")
        else:
            ax.plot(steps, [r[key] for r in hist], lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"arithmetic GRPO{' (shuffled-reward control)' if log['recipe']['control'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_recipe(out: str, recipe: Recipe = Recipe(), minutes: float | None = None, resume: bool = False,
               threads: int | None = None, quiet: bool = False,
               say: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Run pretraining then GRPO into OUT: rl_state.pt (resumable), rl_log.json, rl_curves.png.

    Args:
        out: output directory (new or empty; or an earlier run's with `resume`).
        recipe: hyper-parameters.
        minutes: wall-clock limit of this invocation; when reached, the state is saved and the log
            written with "completed": false (resume continues).
        resume: continue from OUT/rl_state.pt.
        threads: torch intra-op threads (default: torch's).
        quiet: no progress bar.
        say: where status lines go.

    Returns:
        The log (also OUT/rl_log.json): pass@1 before/after, per-step history, evaluations.

    Raises:
        RecipeError: bad arguments or output directory (one line).
    """
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise RecipeError(f"--minutes must be a positive number, got {minutes:g}")
    if threads is not None and threads < 1:
        raise RecipeError(f"--threads must be >= 1, got {threads}")
    recipe.validate()
    out = check_out_dir(out, resume)
    if threads:
        torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    deadline = time.perf_counter() + minutes * 60 if minutes else math.inf
    tok = CharTokenizer()
    cfg = model_config()
    train_set, held = split_problems(recipe.digits, recipe.held_out, recipe.seed)
    held_prompts = [[BOS, *tok.encode(p.prompt)] for p in held]
    held_answers = [p.answer for p in held]
    new_tokens = max_new_tokens(recipe.digits)
    model = build_model(cfg, seed=recipe.seed)
    corpus = ArithmeticCorpus(train_set, tok, recipe.digits, recipe.reasoning_fraction)
    tc = recipe.train_config()
    state_path = os.path.join(out, STATE_FILE)
    st: dict[str, Any] = {"phase": "pretrain", "step": 0, "history": [], "pretrain_history": [], "evals": [],
                          "before": None, "seconds": 0.0}
    saved = None
    if resume:
        try:
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 — torch raises assorted errors on damaged files
            raise RecipeError(f"{state_path}: cannot be read as a training state ({type(e).__name__})") from None
        if json.loads(saved["recipe"]) != dataclasses.asdict(recipe):
            raise RecipeError(f"{state_path}: saved with different recipe settings; resume with the same ones")
        st = json.loads(saved["meta"])
        model.load_state_dict(saved["model"])
        say(f"resuming: {st['phase']} step {st['step']}")
    accuracy_fn = accuracy_reward
    params = sum(p.numel() for p in model.parameters())
    say(f"arithmetic: {recipe.digits}-digit additions, {len(train_set)} training / {len(held)} held-out problems; "
        f"model {params / 1e6:.3f}M parameters ({cfg.n_routed_experts} routed experts, MTP); "
        f"{recipe.pretrain_steps} supervised steps, then {recipe.grpo_steps} GRPO steps "
        f"({recipe.prompts_per_step} prompts × G={recipe.group_size}, μ={recipe.inner_steps})"
        f"{', SHUFFLED-REWARD CONTROL' if recipe.control else ''}")
    t_run = time.perf_counter()
    seconds0 = st["seconds"]
    stopped = False

    def elapsed() -> float:
        return seconds0 + time.perf_counter() - t_run

    def meta_payload(extra: dict[str, Any]) -> dict[str, Any]:
        st["seconds"] = elapsed()
        return {"recipe": json.dumps(dataclasses.asdict(recipe)), "meta": json.dumps(st), **extra}

    # ----------------------------------------------------------------- supervised pretraining
    if st["phase"] == "pretrain":
        opt = make_optimizer(model, tc)
        if saved is not None and "optimizer" in saved:
            opt.load_state_dict(saved["optimizer"])
        balancer = BiasUpdater(model, tc.gamma)
        bar = tqdm(total=recipe.pretrain_steps, initial=st["step"], desc="pretrain", unit="step", disable=quiet,
                   file=sys.stderr, dynamic_ncols=True)
        model.train()
        while st["step"] < recipe.pretrain_steps:
            gen = torch.Generator().manual_seed(recipe.seed * SEED_STRIDE + st["step"])
            rec = train_step(model, opt, balancer, corpus, tc, st["step"], gen)
            st["pretrain_history"].append({k: rec[k] for k in ("step", "lm_loss", "mtp_loss", "lr")})
            st["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{rec['lm_loss']:.3f}", refresh=False)
            if time.perf_counter() >= deadline and st["step"] < recipe.pretrain_steps:
                stopped = True
            if st["step"] % recipe.save_every == 0 or stopped:
                _save_state(state_path, meta_payload({"model": model.state_dict(), "optimizer": opt.state_dict()}))
            if stopped:
                break
        bar.close()
        if not stopped:
            p1, _ = greedy_pass_at_1(model, held_prompts, held_answers, tok.decode, new_tokens, EOS, accuracy_fn)
            st["before"] = p1
            st["evals"].append({"step": 0, "pass_at_1": p1})
            st["phase"], st["step"] = "grpo", 0
            say(f"after {recipe.pretrain_steps} supervised steps: held-out greedy pass@1 {100 * p1:.1f}%")
            saved = None
            _save_state(state_path, meta_payload({"model": model.state_dict()}))

    # ----------------------------------------------------------------- GRPO
    if st["phase"] == "grpo" and not stopped:
        trainer = GRPOTrainer(model, reward_fn(recipe.format_weight), tok.decode, EOS, recipe.grpo_config(),
                              metrics={"accuracy": accuracy_reward, "format": lambda c, a: format_reward(c)})
        if saved is not None and "ref" in saved:
            trainer.load_state_dict(saved)
        bar = tqdm(total=recipe.grpo_steps, initial=st["step"], desc="grpo", unit="step", disable=quiet,
                   file=sys.stderr, dynamic_ncols=True)
        while st["step"] < recipe.grpo_steps:
            s = st["step"]
            gen = torch.Generator().manual_seed(recipe.seed * SEED_STRIDE + GRPO_OFFSET + s)
            pick = torch.randint(len(train_set), (recipe.prompts_per_step,), generator=gen).tolist()
            prompts = [[BOS, *tok.encode(train_set[i].prompt)] for i in pick]
            rec = trainer.step(prompts, [train_set[i].answer for i in pick], s, recipe.seed)
            if "skipped" in rec:
                say(f"step {s + 1}: skipped ({rec['skipped']})")
            st["history"].append(rec)
            st["step"] += 1
            if st["step"] % recipe.eval_every == 0 or st["step"] == recipe.grpo_steps:
                p1, _ = greedy_pass_at_1(model, held_prompts, held_answers, tok.decode, new_tokens, EOS, accuracy_fn)
                st["evals"].append({"step": st["step"], "pass_at_1": p1})
            bar.update(1)
            if "skipped" not in rec:
                bar.set_postfix(reward=f"{rec['reward']:.2f}", acc=f"{rec['accuracy']:.2f}", kl=f"{rec['kl']:.3f}",
                                p1=f"{100 * st['evals'][-1]['pass_at_1']:.0f}%", refresh=False)
            if time.perf_counter() >= deadline and st["step"] < recipe.grpo_steps:
                stopped = True
            if st["step"] % recipe.save_every == 0 or st["step"] == recipe.grpo_steps or stopped:
                _save_state(state_path, meta_payload(trainer.state_dict()))
            if stopped:
                break
        bar.close()
    if stopped:
        _ = meta_payload({})
    done = st["phase"] == "grpo" and st["step"] >= recipe.grpo_steps
    after = st["evals"][-1]["pass_at_1"] if done else None
    log = {"recipe": dataclasses.asdict(recipe), "config": cfg.to_dict(), "parameters": params,
           "threads": torch.get_num_threads(), "completed": done, "phase": st["phase"], "step": st["step"],
           "seconds": elapsed(), "held_out": len(held), "pass_at_1_before": st["before"], "pass_at_1_after": after,
           "skipped_steps": [r for r in st["history"] if "skipped" in r], "evals": st["evals"],
           "pretrain_history": st["pretrain_history"], "history": st["history"]}
    with open(os.path.join(out, LOG_FILE), "w", encoding="utf-8") as f:
        json.dump(log, f, indent=1)
    if stopped:
        say(f"time limit reached ({st['phase']} step {st['step']}): state saved in {state_path}; "
            f"continue with --resume")
    elif done:
        say(f"held-out greedy pass@1: {100 * st['before']:.1f}% before GRPO → {100 * after:.1f}% after "
            f"{recipe.grpo_steps} steps ({elapsed() / 60:.1f} min in all)")
    say(f"wrote {os.path.join(out, LOG_FILE)}")
    png = plot_log(log, os.path.join(out, PLOT_FILE)) if st["history"] else None
    if png:
        say(f"wrote {png}")
    return log
