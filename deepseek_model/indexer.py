"""DeepSeek-V3.2's lightning indexer: which earlier tokens each query attends to (DeepSeek Sparse Attention).

Per layer, the indexer scores every query token t against every visible key token s:

    score[t, s] = Σ_h w_h(x_t) · ReLU(q_{t,h} · k_s) · (n_heads · head_dim)^-½

with q = wq_b(MLA's normalised query latent) split into `index_n_heads` heads, one shared key per
token k = LayerNorm(wk(x)) (with bias), and per-head weights w = weights_proj(x) in fp32. RoPE
rotates the FIRST qk_rope_head_dim channels of each index head and key, half-split (rotate-half,
not interleaved as MLA's rope is). Attention then keeps the top `index_topk` visible tokens per
query. The positive constant scales commute with ReLU and never change the selection.

Index keys are cached beside the latent cache (attention.IndexKeyCache): exact in the compute
dtype (the oracle, as transformers computes), or FP8 e4m3 with one scale per token as the official
kernels keep them; the FP8 mode rotates q and k by a normalised Hadamard matrix first (an
orthogonal map: exact scores are unchanged, FP8 outliers are spread) when head_dim is a power of 2,
and quantizes each query head with its own scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_model.config import ModelConfig
from deepseek_model.constants import is_pow2
from deepseek_model.kernels import ops
from deepseek_model.layers import Linear, LinearSpec
from deepseek_model.rope import apply_rotary_half

INDEX_NORM_EPS = 1e-6  # the k_norm LayerNorm's eps (not in config.json)


def hadamard(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Sylvester Hadamard matrix of order d (a power of two), scaled by d^-½ (orthogonal)."""
    if not is_pow2(d):
        raise ValueError(f"hadamard: order {d} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)  # (2n, 2n)
    return (h * d ** -0.5).to(dtype=dtype, device=device)


def rotary_like_mla(x: torch.Tensor, table: torch.Tensor, rope: int) -> torch.Tensor:
    """Rotate the first `rope` channels of x (B, T, [H,] D) half-split with MLA's rotary table.

    table: complex (T, rope/2) shared by every row, or (B, T, rope/2) per row.
    """
    x_rope, x_pass = x.split([rope, x.shape[-1] - rope], dim=-1)  # (.., rope), (.., D - rope)
    if table.dim() == 2:
        rotated = apply_rotary_half(x_rope, table)
    else:
        b, t = x.shape[:2]
        flat = x_rope.reshape(1, b * t, *x_rope.shape[2:])  # (1, B*T, [H,] rope)
        rotated = apply_rotary_half(flat, table.reshape(b * t, -1)).view_as(x_rope)
    return torch.cat([rotated, x_pass], dim=-1)  # (B, T, [H,] D)


class Indexer(nn.Module):
    """The lightning indexer of one attention layer (replicated on every tensor-parallel rank).

    Args:
        cfg: a config with index_n_heads, index_head_dim, index_topk and q_lora_rank.
        spec: how linears store/run weights (wq_b and wk follow it; weights_proj stays fp32).
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
        self.rope = cfg.qk_rope_head_dim
        self.backend, self.scale_fmt = spec.backend, spec.scale_fmt
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, spec)
        self.wk = Linear(cfg.hidden_size, self.head_dim, spec)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=INDEX_NORM_EPS, dtype=torch.float32, device=spec.device)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False, dtype=torch.float32,
                                      device=spec.device)
        self.weight_scale = (self.n_heads * self.head_dim) ** -0.5  # head-weight and dot-product scalings
        rotation = hadamard(self.head_dim, device=spec.device) if is_pow2(self.head_dim) else None
        self.register_buffer("rotation", rotation, persistent=False)  # FP8 mode's Hadamard matrix (D, D)

    def keys(self, x: torch.Tensor, rotary: torch.Tensor) -> torch.Tensor:
        """Index keys (B, T, D) of the tokens x (B, T, hidden) (after the layer's input norm)."""
        wide = self.k_norm.weight.dtype  # fp32 (wider when the whole model was cast up)
        k = F.layer_norm(self.wk(x).to(wide), (self.head_dim,), self.k_norm.weight, self.k_norm.bias,
                         INDEX_NORM_EPS).to(x.dtype)  # (B, T, D)
        return rotary_like_mla(k, rotary, self.rope)

    def queries(self, q_latent: torch.Tensor, x: torch.Tensor, rotary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated index queries (B, T, H, D) and their fp32 head weights (B, T, H), scalings folded in.

        Args:
            q_latent: (B, T, q_lora_rank) MLA's normalised query latent.
            x: (B, T, hidden) the layer's normed input.
            rotary: the rotary table of these positions.
        """
        bsz, t, _ = q_latent.shape
        q = self.wq_b(q_latent).view(bsz, t, self.n_heads, self.head_dim)  # (B, T, H, D)
        wide = self.weights_proj.weight.dtype  # fp32 (wider when the whole model was cast up)
        w = F.linear(x.to(wide), self.weights_proj.weight) * self.weight_scale  # (B, T, H)
        return rotary_like_mla(q, rotary, self.rope), w

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FP8 mode: Hadamard-rotate (power-of-two head_dim) and quantize per row (…, D) with one
        fp32 scale per row → (float8 (…, D), scale (…))."""
        if self.rotation is not None:
            x = x.float() @ self.rotation.float()  # (…, D) orthogonal rotation
        q8, s = ops.act_quant(x, self.head_dim, self.scale_fmt, backend=self.backend)  # (…, D), (…, 1)
        return q8, s.squeeze(-1)

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor | None,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Index scores (B, T, S) fp32 of queries q (B, T, H, D) against cached keys (B, S, D);
        masked (future, padding) keys are -inf.

        Args:
            q, w: from `queries`.
            keys, key_scale: the cached keys (float8 with per-token scales (B, S) in FP8 mode, else float).
            mask: additive (T, S) or (B, 1, T, S) mask, or None (every key visible).
        """
        if key_scale is not None:
            q, q_scale = self.quantize(q)  # (B, T, H, D) fp8, (B, T, H)
        else:
            q_scale = None
        logits = ops.index_logits(q, q_scale, keys, key_scale, w, backend=self.backend)  # (B, T, S)
        if mask is not None:
            logits.add_(mask if mask.dim() == 2 else mask[:, 0])  # (B, T, S)
        return logits

    def select(self, scores: torch.Tensor, ordered: bool = False) -> torch.Tensor:
        """The top min(index_topk, S) keys per query: (B, T, K) int64, -1 where fewer keys than K
        are visible (a masked key is never selected); ascending when `ordered`, else in no order.

        Equal scores are common (a key whose every head's ReLU is 0 scores exactly 0), and
        torch.topk breaks ties arbitrarily — differently for a prefill row and the same query in a
        decode step. Here a tie at the boundary goes to the later token, always: when the K-th and
        (K+1)-th scores of some query are equal, the top-k runs on int64 keys (the score's
        order-preserving integer image, then the position).
        """
        s = scores.shape[-1]
        k = min(self.topk, s)
        top, idx = scores.topk(min(k + 1, s), dim=-1, sorted=False)  # (B, T, K+1) in no order (sorting costs 2x)
        tied = None
        if k < s:  # drop the worst of the K+1, the best score left out
            after, worst = top.min(dim=-1, keepdim=True)  # (B, T, 1)
            top = top.scatter(-1, worst, top[..., k:])[..., :k]  # (B, T, K): the last column moved into its place
            idx = idx.scatter(-1, worst, idx[..., k:])[..., :k]  # (B, T, K)
            after = after[..., 0]  # (B, T)
            tied = (top.min(dim=-1).values == after) & (after > float("-inf"))  # (B, T) the K-th best == it
        if tied is not None and bool(tied.any()):  # re-rank only the queries with a tie at the boundary
            rows = tied.nonzero(as_tuple=True)  # (b, t) index tensors
            picked = scores[rows].float()  # (N, S)
            bits = (picked + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
            rank = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)  # monotone in the score
            rank = rank * (1 << 32) + torch.arange(s, device=scores.device)  # ties → the later position
            idx, top = idx.clone(), top.clone()
            chosen = rank.topk(k, dim=-1).indices  # (N, K)
            idx[rows], top[rows] = chosen, picked.gather(-1, chosen).to(top.dtype)
        idx = idx.masked_fill(top == float("-inf"), -1)
        return idx.sort(dim=-1).values if ordered else idx
