"""The GRPO loop: sample G outputs per prompt, score them with rule rewards, optimise the clipped
objective against a frozen reference, with the MoE routing-bias updates left on.

One `GRPOTrainer.step` is one batch of prompts:

1. sample G completions per prompt from the current policy (`deepseek_model.generate.generate`,
   batched over the latent cache, temperature τ);
2. score them (`rewards.score`); a reward function that raises or returns NaN/inf makes the step
   a *skipped* record (reported, nothing trained on);
3. group-relative advantages (`group_advantages`); in the shuffled-reward control the rewards are
   first permuted across the whole batch, which keeps their distribution but breaks their link to
   the outputs;
4. old-policy and reference log-probs of the sampled tokens, once, without gradients;
5. `inner_steps` AdamW updates on `grpo_loss`, each followed by the bias update of every router
   (`BiasUpdater`, counting the routing the training forwards return: sampling, scoring and the
   old/reference passes are not recorded).

Log-probs are those of the sampling distribution, softmax(logits / τ).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from deepseek_model.generate import generate
from deepseek_model.model import RouterOutput, Transformer
from deepseek_model.rl.objective import CLIP_EPS, KL_COEF, grpo_terms, group_advantages
from deepseek_model.rl.rewards import RewardError, RewardFn, score
from deepseek_model.training import BETAS, GAMMA, BiasUpdater

CONTROLS = (None, "shuffled")
SHUFFLE_STRIDE = 7_919  # control permutation generator of step s: seed · SHUFFLE_STRIDE + s
SAMPLE_STRIDE = 1_000_003  # output k of step s samples with seed · SAMPLE_STRIDE + s · (P·G) + k


@dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of the GRPO loop."""

    group_size: int = 8  # G, outputs sampled per prompt (>= 2)
    max_new_tokens: int = 32  # longest output
    temperature: float = 1.0  # sampling temperature τ (> 0)
    inner_steps: int = 2  # μ, optimizer steps on each sampled batch (the ratio moves away from 1 after the first)
    clip_eps: float = CLIP_EPS  # ε of the ratio clip
    kl_coef: float = KL_COEF  # β of the KL penalty
    lr: float = 1e-3  # AdamW learning rate (constant after the warm-up)
    warmup: int = 0  # steps of linear learning-rate warm-up (fresh Adam moments are noisy)
    weight_decay: float = 0.0  # AdamW weight decay on matrices
    grad_clip: float = 1.0  # max global gradient norm
    gamma: float = GAMMA  # router bias update speed γ (0: statistics only)
    control: str | None = None  # None, or "shuffled" (rewards permuted within each batch: the control run)

    def validate(self) -> None:
        """Raise a one-line ValueError naming the first bad field."""
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (the std of a group of one is undefined), got {self.group_size}")
        for name in ("max_new_tokens", "inner_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("clip_eps", "kl_coef", "weight_decay", "grad_clip", "gamma", "warmup"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {self.control!r}")


def check_prompts(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Refuse prompts that leave no room for `max_new_tokens` in the model's context (one-line ValueError)."""
    if not prompts:
        raise ValueError("prompts: empty batch")
    longest = max(len(p) for p in prompts)
    if longest == 0:
        raise ValueError("prompts: a prompt is empty")
    if longest + max_new_tokens > model.max_seq_len:
        raise ValueError(f"prompts: a prompt of {longest} tokens + {max_new_tokens} new tokens is longer than the "
                         f"context ({model.max_seq_len} tokens)")


def pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt+completion rows and where each completion sits.

    Args:
        prompts: N prompts (token ids).
        completions: N completions (token ids, each non-empty).
        device: where the tensors go.

    Returns:
        ids (N, L) int64 (padding 0), index (N, T) int64 positions of completion token j in its row
        (clamped into range on padding), mask (N, T) bool, T the longest completion.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"completions: {len(completions)} completions for {len(prompts)} prompts")
    if any(len(c) == 0 for c in completions):
        raise ValueError("completions: an output has no tokens")
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    t = max(len(c) for c in completions)
    ids = torch.zeros(len(prompts), longest, dtype=torch.int64)  # (N, L)
    index = torch.zeros(len(prompts), t, dtype=torch.int64)  # (N, T)
    mask = torch.zeros(len(prompts), t, dtype=torch.bool)  # (N, T)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = list(p) + list(c)
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        index[i] = (len(p) + torch.arange(t)).clamp_max(longest - 1)
        mask[i, : len(c)] = True
    return ids.to(device), index.to(device), mask.to(device)


def token_logprobs(model: Transformer, ids: torch.Tensor, index: torch.Tensor,
                   temperature: float = 1.0, router: list[RouterOutput] | None = None) -> torch.Tensor:
    """log π(ids[i, index[i, j]] | ids[i, :index[i, j]]) under softmax(logits / temperature).

    Args:
        model: the policy (causal, so right padding does not change earlier positions).
        ids: (N, L) token rows.
        index: (N, T) positions (>= 1) of the scored tokens.
        temperature: the sampling temperature.
        router: when given, the forward's routing of every MoE layer is appended here.

    Returns:
        (N, T) fp32 log-probs (differentiable when grad is enabled).
    """
    if router is None:
        logits = model(ids)  # (N, L, V)
    else:
        out = model(ids, outputs={"router"})
        router.extend(out.router)
        logits = out.logits
    logits = logits.float() / temperature  # (N, L, V)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (N, L-1, V): row k predicts token k+1
    pred = (index - 1).clamp_min(0)  # (N, T) rows predicting the scored tokens
    rows = logp.gather(1, pred.unsqueeze(-1).expand(-1, -1, logp.shape[-1]))  # (N, T, V)
    return rows.gather(2, ids.gather(1, index).unsqueeze(-1)).squeeze(-1)  # (N, T)


def greedy_pass_at_1(model: Transformer, prompts: Sequence[Sequence[int]], answers: Sequence[str],
                     decode: Callable[[list[int]], str], max_new_tokens: int, eos: int,
                     reward_fn: RewardFn, batch_size: int = 256) -> tuple[float, list[str]]:
    """Fraction of prompts whose greedy output has reward_fn(output, answer) == 1, and the outputs.

    The model is put in eval mode for decoding and restored after; no gradients.
    """
    was = model.training
    model.eval()
    texts: list[str] = []
    try:
        for s in range(0, len(prompts), batch_size):
            res = generate(model, [list(p) for p in prompts[s:s + batch_size]], max_new_tokens=max_new_tokens,
                           temperature=0.0, eos=eos)
            texts += [decode([t for t in toks if t != eos]) for toks in res.tokens]
    finally:
        model.train(was)
    hits = sum(reward_fn(t, a) == 1.0 for t, a in zip(texts, answers))
    return hits / len(prompts), texts


def frozen_copy(model: Transformer) -> Transformer:
    """A deep copy of `model` in eval mode without gradients (the reference policy)."""
    ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return ref


class GRPOTrainer:
    """GRPO on a Transformer policy with a frozen reference copy and the router bias updates.

    Args:
        model: the policy (e.g. after supervised pretraining), trained in place.
        reward_fn: reward of (completion text, reference answer).
        decode: token ids → text (the EOS token is removed before decoding).
        eos: the end-of-output token id (sampling stops there; it is scored as part of the output).
        cfg: hyper-parameters.
        metrics: extra (name → fn(completion, answer)) means logged per step, not trained on.
        ref: the reference model (default: a frozen deep copy of `model` as it is now).
    """

    def __init__(self, model: Transformer, reward_fn: RewardFn, decode: Callable[[list[int]], str], eos: int,
                 cfg: GRPOConfig = GRPOConfig(), metrics: dict[str, RewardFn] | None = None,
                 ref: Transformer | None = None):
        cfg.validate()
        self.model, self.reward_fn, self.decode, self.eos, self.cfg = model, reward_fn, decode, eos, cfg
        self.metrics = dict(metrics or {})
        self.ref = ref if ref is not None else frozen_copy(model)
        self.ref.eval().requires_grad_(False)
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=BETAS)
        self.balancer = BiasUpdater(model, cfg.gamma)

    def sample(self, prompts: Sequence[Sequence[int]], seed: int) -> list[list[int]]:
        """G sampled outputs per prompt (prompt-major: the G outputs of prompt 0 first)."""
        rows = [list(p) for p in prompts for _ in range(self.cfg.group_size)]
        self.model.eval()
        try:
            res = generate(self.model, rows, max_new_tokens=self.cfg.max_new_tokens,
                           temperature=self.cfg.temperature, eos=self.eos, seed=seed)
        finally:
            self.model.train()
        return res.tokens

    def step(self, prompts: Sequence[Sequence[int]], answers: Sequence[str], step: int,
             seed: int = 0) -> dict[str, Any]:
        """One GRPO batch: sample, score, `inner_steps` updates; returns the step record.

        Args:
            prompts: P prompts (token ids).
            answers: their reference answers.
            step: the step number (recorded; seeds the sampling with seed and the control's permutation).
            seed: run seed.

        Returns:
            The record: reward/metric means, KL, clip fraction, response length, loss, grad norm,
            expert load, seconds; or {"step", "skipped": reason} when the rewards failed.

        Raises:
            ValueError: prompts longer than the context, or answers/prompts of different lengths.
        """
        cfg = self.cfg
        if len(answers) != len(prompts):
            raise ValueError(f"answers: {len(answers)} answers for {len(prompts)} prompts")
        check_prompts(self.model, prompts, cfg.max_new_tokens)
        t0 = time.perf_counter()
        g = cfg.group_size
        outputs = self.sample(prompts, seed * SAMPLE_STRIDE + step * len(prompts) * g)
        texts = [self.decode([t for t in o if t != self.eos]) for o in outputs]
        answers_g = [a for a in answers for _ in range(g)]
        try:
            rewards = score(self.reward_fn, texts, answers_g)
        except RewardError as e:
            return {"step": step, "skipped": str(e), "seconds": time.perf_counter() - t0}
        device = self.model.inv_freq.device
        r = torch.tensor(rewards, dtype=torch.float32, device=device)  # (P·G,)
        trained_on = r
        if cfg.control == "shuffled":
            gen = torch.Generator().manual_seed(seed * SHUFFLE_STRIDE + step)
            trained_on = r[torch.randperm(r.numel(), generator=gen).to(device)]  # (P·G,)
        adv = group_advantages(trained_on, g)  # (P·G,)
        rows = [list(p) for p in prompts for _ in range(g)]
        ids, index, mask = pack(rows, outputs, device)  # (N, L), (N, T), (N, T)
        with torch.no_grad():
            was = self.model.training
            self.model.eval()
            old = token_logprobs(self.model, ids, index, cfg.temperature)  # (N, T)
            self.model.train(was)
            ref = token_logprobs(self.ref, ids, index, cfg.temperature)  # (N, T)
        self.model.train()
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        losses, kls, clips, norms = [], [], [], []
        for _ in range(cfg.inner_steps):
            routed: list[RouterOutput] = []
            lp = token_logprobs(self.model, ids, index, cfg.temperature, router=routed)  # (N, T)
            self.balancer.record(routed)  # only the training forwards count as expert load
            terms = grpo_terms(lp, old, ref, adv, mask, cfg.clip_eps, cfg.kl_coef)
            terms.loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            stats = self.balancer.step()
            losses.append(terms.loss.item())
            kls.append(terms.kl.item())
            clips.append(terms.clip_fraction.item())
        rec: dict[str, Any] = {
            "step": step, "reward": sum(rewards) / len(rewards), "loss": sum(losses) / len(losses),
            "kl": kls[0], "kl_last": kls[-1], "clip_fraction": sum(clips) / len(clips),
            "response_length": float(mask.sum(dim=1).float().mean()), "grad_norm": sum(norms) / len(norms),
            "groups_all_equal": int((r.view(-1, g).std(dim=1) == 0).sum()), "lr": lr,  # (P, G) view
        }
        for name, fn in self.metrics.items():
            vals = [fn(t, a) for t, a in zip(texts, answers_g)]
            rec[name] = sum(vals) / len(vals)
        used = [s for s in stats.values() if int(s.counts.sum())]  # the MTP block's router is not run here
        if used:
            rec["max_over_mean"] = sum(s.max_over_mean for s in used) / len(used)
        rec["seconds"] = time.perf_counter() - t0
        return rec

    def state_dict(self) -> dict[str, Any]:
        """Policy, reference and optimizer state (the router biases are part of the model's)."""
        return {"model": self.model.state_dict(), "ref": self.ref.state_dict(), "optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.model.load_state_dict(state["model"])
        self.ref.load_state_dict(state["ref"])
        self.opt.load_state_dict(state["optimizer"])
