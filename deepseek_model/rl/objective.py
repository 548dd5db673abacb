"""The GRPO objective (DeepSeekMath eq. 3, as used for DeepSeek-R1-Zero), exactly.

For a prompt q, G outputs o_1..o_G are sampled from the old policy and scored r_1..r_G. Each output
gets the group-relative advantage Â_i = (r_i − mean(r)) / (std(r) + eps) (unbiased std over the
group), shared by all its tokens. Per token t of output i, with ratio ρ = π_θ / π_old:

    surrogate = min(ρ·Â_i, clip(ρ, 1 − ε, 1 + ε)·Â_i)
    KL        = π_ref/π_θ − log(π_ref/π_θ) − 1          (the unbiased, non-negative k3 estimator)
    objective = surrogate − β·KL

averaged over the output's tokens, then over the outputs; the loss is −objective. The old-policy
and reference log-probs are constants (no gradient flows into them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_EPS = 1e-4  # added to the group std (equal rewards give zero advantages, never 0/0)
CLIP_EPS = 0.2  # ε of the clipped ratio
KL_COEF = 0.04  # β of the KL penalty (DeepSeekMath: 0.04)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Group-relative advantages (r − mean_group) / (std_group + eps).

    Args:
        rewards: (P·G,) rewards ordered group by group (the G outputs of prompt 0, then prompt 1, …).
        group_size: G, outputs per prompt (>= 2: the std of one sample is undefined).
        eps: added to the unbiased std of each group.

    Returns:
        (P·G,) advantages in the rewards' floating dtype (float32 for integer rewards); a group
        whose rewards are all equal gets exactly 0 (its mean may round, its signal is none).

    Raises:
        ValueError: rewards not 1-D, group_size < 2, a length not divisible by group_size, eps < 0,
            or NaN / infinite rewards.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor (P·G,), got "
                         f"{tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (the std of a group of one is undefined), got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"rewards: length {rewards.numel()} is not a positive multiple of group_size {group_size}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    if not torch.isfinite(r).all():
        raise ValueError(f"rewards: {int((~torch.isfinite(r)).sum())} NaN or infinite value(s)")
    groups = r.view(-1, group_size)  # (P, G)
    mean = groups.mean(dim=1, keepdim=True)  # (P, 1)
    std = groups.std(dim=1, unbiased=True, keepdim=True)  # (P, 1)
    equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # (P, 1) no signal: exactly 0 (also for eps 0)
    adv = torch.where(equal, torch.zeros_like(groups), (groups - mean) / (std + eps))  # (P, G)
    return adv.reshape(-1)  # (P·G,)


@dataclass
class GRPOTerms:
    """The loss and its diagnostics (all scalars; only `loss` carries a graph).

    Attributes:
        loss: −objective, the quantity to minimise.
        surrogate: mean clipped surrogate (per output over its tokens, then over outputs).
        kl: mean k3 KL estimate to the reference, averaged the same way.
        clip_fraction: fraction of the masked tokens where the clip is active (the gradient of the
            surrogate is zero there).
        ratio_mean: mean ratio π_θ/π_old over the masked tokens.
    """

    loss: torch.Tensor
    surrogate: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def grpo_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
               advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = CLIP_EPS,
               kl_coef: float = KL_COEF) -> GRPOTerms:
    """The GRPO loss with its diagnostics; see `grpo_loss` for the arguments."""
    if not isinstance(logprobs, torch.Tensor) or logprobs.dim() != 2:
        raise ValueError(f"logprobs must be a (N, T) tensor, got "
                         f"{tuple(logprobs.shape) if isinstance(logprobs, torch.Tensor) else type(logprobs).__name__}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be floating point, got {logprobs.dtype}")
    n, t = logprobs.shape
    _check("old_logprobs", old_logprobs, (n, t))
    _check("ref_logprobs", ref_logprobs, (n, t))
    _check("mask", mask, (n, t))
    _check("advantages", advantages, (n,))
    if not clip_eps >= 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    m = mask.to(device=logprobs.device, dtype=logprobs.dtype)  # (N, T)
    if ((m != 0) & (m != 1)).any():
        raise ValueError("mask must hold only 0/1 (or False/True)")
    lengths = m.sum(dim=1)  # (N,)
    if (lengths == 0).any():
        raise ValueError(f"mask: row {int((lengths == 0).nonzero()[0])} has no tokens (an output needs >= 1 token)")
    old = old_logprobs.detach().to(logprobs.dtype)  # (N, T) constants
    ref = ref_logprobs.detach().to(logprobs.dtype)  # (N, T) constants
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)  # (N, 1), shared by an output's tokens
    # Padding may hold anything (e.g. -inf log-probs): zero it before exp so no NaN enters the graph.
    live = m.bool()  # (N, T)
    log_ratio = torch.where(live, logprobs - old, torch.zeros_like(logprobs))  # (N, T)
    ratio = log_ratio.exp()  # (N, T)
    unclipped = ratio * adv  # (N, T)
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv  # (N, T)
    surrogate = torch.minimum(unclipped, clipped)  # (N, T)
    ref_minus = torch.where(live, ref - logprobs, torch.zeros_like(logprobs))  # (N, T) log(π_ref/π_θ)
    kl = ref_minus.exp() - ref_minus - 1.0  # (N, T) k3 estimator, >= 0
    per_token = surrogate - kl_coef * kl  # (N, T)

    def per_output_mean(x: torch.Tensor) -> torch.Tensor:
        return ((x * m).sum(dim=1) / lengths).mean()  # masked mean over tokens (N,), then over outputs

    objective = per_output_mean(per_token)
    with torch.no_grad():
        is_clipped = ((adv > 0) & (ratio > 1.0 + clip_eps)) | ((adv < 0) & (ratio < 1.0 - clip_eps))  # (N, T)
        total = lengths.sum()
        clip_fraction = (is_clipped.to(m.dtype) * m).sum() / total
        ratio_mean = (ratio * m).sum() / total
        surrogate_mean = per_output_mean(surrogate)
        kl_mean = per_output_mean(kl)
    return GRPOTerms(-objective, surrogate_mean, kl_mean, clip_fraction, ratio_mean)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = CLIP_EPS,
              kl_coef: float = KL_COEF) -> torch.Tensor:
    """The GRPO loss −J(θ) of DeepSeekMath eq. 3 (per-output token means, then the mean over outputs).

    Per token: ratio = exp(logprobs − old_logprobs); surrogate = min(ratio·A, clip(ratio, 1−ε, 1+ε)·A);
    KL = exp(ref − logprobs) − (ref − logprobs) − 1; objective = surrogate − β·KL.

    Args:
        logprobs: (N, T) log π_θ of each output token (differentiable), padding anywhere.
        old_logprobs: (N, T) log π_old of the same tokens (the sampling policy; treated as constant).
        ref_logprobs: (N, T) log π_ref of the same tokens (the frozen reference; constant).
        advantages: (N,) one advantage per output (e.g. from `group_advantages`; constant).
        mask: (N, T) 1/True for the output's tokens, 0/False for padding; every row needs a token.
        clip_eps: ε of the ratio clip.
        kl_coef: β, the weight of the KL penalty.

    Returns:
        The scalar loss (−objective), in logprobs' dtype.

    Raises:
        ValueError: a shape that does not match (naming the argument), a mask row without tokens,
            a mask value other than 0/1, or a negative clip_eps / kl_coef.
    """
    return grpo_terms(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps, kl_coef).loss
