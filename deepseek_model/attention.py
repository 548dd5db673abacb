"""Multi-head Latent Attention (MLA): naive and weight-absorbed forward over one latent cache.

Per token and layer the cache holds the normalised KV latent c (kv_lora_rank values) and the
post-RoPE shared key k_rope (qk_rope_head_dim values): 576 numbers for DeepSeek-V3, shared by all
heads. The naive path expands the latents to per-head keys/values with kv_b; the absorbed path
folds kv_b into the query and the output instead (equal to fp32 round-off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_model.config import ModelConfig
from deepseek_model.constants import FP8_DTYPE, FP8_MAX
from deepseek_model.kernels import ops
from deepseek_model.layers import ColumnParallelLinear, Linear, LinearSpec, RMSNorm, RowParallelLinear
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext
from deepseek_model.rope import apply_rotary

ATTN_MODES = ("absorb", "naive", "auto")  # auto: naive for multi-token chunks (prefill), absorbed for decode
GROWTH = 2  # the cache grows geometrically: amortised O(1) copies per token
FP8_SCALE_MIN = 1e-12  # keeps the per-token scale of an all-zero latent finite


def _rotate(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """apply_rotary with a shared (T, rope/2) table or per-row (B, T, rope/2) tables."""
    if table.dim() == 2:
        return apply_rotary(x, table)
    b, t = x.shape[:2]
    flat = x.reshape(1, b * t, *x.shape[2:])  # (1, B*T, [H,] rope): one row of B*T positions
    return apply_rotary(flat, table.reshape(b * t, -1)).view_as(x)


def _key_starts(mask: torch.Tensor | None) -> torch.Tensor | None:
    """For a one-query row mask (B, 1, 1, S) whose allowed keys are a suffix [start_b, S) of every
    row (a left-padded batch), the (B,) starts; None for anything else (no mask included)."""
    if mask is None or mask.dim() != 4 or mask.shape[2] != 1:
        return None
    allowed = mask[:, 0, 0] == 0  # (B, S)
    starts = allowed.to(torch.int32).argmax(dim=-1)  # (B,) first allowed key
    suffix = torch.arange(allowed.shape[1], device=mask.device)[None, :] >= starts[:, None]  # (B, S)
    return starts if bool(torch.equal(allowed, suffix)) else None


class LatentCache:
    """One layer's latent KV cache: grows with use, never preallocated to max_seq_len.

    Attributes:
        kv: (B, capacity, kv_lora_rank) normalised latents (float8_e4m3fn when fp8).
        pe: (B, capacity, qk_rope_head_dim) post-RoPE shared keys (always in the compute dtype).
        kv_scale: (B, capacity, 1) fp32 per-token dequantization scale of kv (fp8 only).

    Args:
        fp8: store the latent as float8_e4m3fn with one fp32 scale per token (amax / FP8_MAX); the rope
            keys stay in the compute dtype.
    """

    def __init__(self, fp8: bool = False) -> None:
        self.fp8 = fp8
        self.length = 0  # positions [0, length) hold written tokens
        self.kv: torch.Tensor | None = None
        self.pe: torch.Tensor | None = None
        self.kv_scale: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Positions allocated so far."""
        return 0 if self.kv is None else self.kv.shape[1]

    def nbytes(self) -> int:
        """Bytes held by this layer's cache."""
        if self.kv is None:
            return 0
        extra = 0 if self.kv_scale is None else self.kv_scale.numel() * self.kv_scale.element_size()
        return self.kv.numel() * self.kv.element_size() + self.pe.numel() * self.pe.element_size() + extra

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (1-D index tensor), e.g. to drop finished sequences."""
        if self.kv is not None:
            self.kv, self.pe = self.kv[rows], self.pe[rows]
            if self.kv_scale is not None:
                self.kv_scale = self.kv_scale[rows]

    def update(self, start_pos: int, kv: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write positions [start_pos, start_pos + T) and return the latents for [0, start_pos + T).

        Writing at a start_pos below what was written before overwrites (this is how speculative
        decoding rolls back rejected tokens).

        Args:
            start_pos: absolute position of the first new token.
            kv: (B, T, kv_lora_rank).
            pe: (B, T, rope_dim).
        """
        bsz, t, _ = kv.shape
        end = start_pos + t
        if self.kv is not None and self.kv.shape[0] != bsz:
            raise ValueError(f"cache holds batch size {self.kv.shape[0]}, got a batch of {bsz}")
        if self.kv is None and start_pos > 0:
            raise ValueError(f"start_pos {start_pos} > 0 but the cache is empty (prefill from position 0 first)")
        if start_pos > self.length:
            raise ValueError(f"start_pos {start_pos} is past the {self.length} cached positions (positions "
                             f"[{self.length}, {start_pos}) were never written; continue at start_pos {self.length})")
        if end > self.capacity:
            new_cap = max(end, GROWTH * self.capacity)
            kv_new = torch.zeros(bsz, new_cap, kv.shape[-1], dtype=FP8_DTYPE if self.fp8 else kv.dtype,
                                 device=kv.device)
            pe_new = pe.new_zeros(bsz, new_cap, pe.shape[-1])
            scale_new = torch.ones(bsz, new_cap, 1, dtype=torch.float32, device=kv.device) if self.fp8 else None
            if self.kv is not None:
                kv_new[:, : self.capacity] = self.kv
                pe_new[:, : self.capacity] = self.pe
                if self.fp8:
                    scale_new[:, : self.capacity] = self.kv_scale
            self.kv, self.pe, self.kv_scale = kv_new, pe_new, scale_new
        self.pe[:, start_pos:end] = pe
        self.length = end  # a write below the old end rolls back what followed it
        if not self.fp8:
            self.kv[:, start_pos:end] = kv
            return self.kv[:, :end], self.pe[:, :end]
        scale = kv.float().abs().amax(-1, keepdim=True).clamp_min(FP8_SCALE_MIN) / FP8_MAX  # (B, T, 1)
        self.kv[:, start_pos:end] = (kv.float() / scale).to(FP8_DTYPE)
        self.kv_scale[:, start_pos:end] = scale
        deq = self.kv[:, :end].float() * self.kv_scale[:, :end]  # (B, S, c) dequantized latents
        return deq.to(kv.dtype), self.pe[:, :end]


class MLA(nn.Module):
    """Multi-head Latent Attention with q LoRA (or a plain q_proj) and a compressed KV latent.

    Args:
        cfg: model config.
        spec: how linears store/run weights.
        ctx: parallel context (heads are split across ranks).
        mode: "absorb" (default), "naive", or "auto" (naive math for multi-token chunks, where the
            per-head dims are smaller than the latent; absorbed for single-token decode). All
            three read and write the same latent cache.
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec, ctx: ParallelContext = SINGLE_PROCESS,
                 mode: str = "absorb"):
        super().__init__()
        if mode not in ATTN_MODES:
            raise ValueError(f"attn must be one of {ATTN_MODES}, got {mode!r}")
        self.mode = mode
        self.batch_invariant = spec.batch_invariant
        self.backend = spec.backend  # kernel backend of the decode step ("triton": ops.mla_decode)
        self.n_heads = ctx.split(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        h, heads, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.rms_norm_eps
        if cfg.q_lora_rank is None:
            self.wq = ColumnParallelLinear(h, heads * cfg.qk_head_dim, spec, ctx)
        else:
            self.wq_a = Linear(h, cfg.q_lora_rank, spec)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps, spec.dtype, spec.device)
            self.wq_b = ColumnParallelLinear(cfg.q_lora_rank, heads * cfg.qk_head_dim, spec, ctx)
        self.wkv_a = Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, spec)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, eps, spec.dtype, spec.device)
        self.wkv_b = ColumnParallelLinear(cfg.kv_lora_rank, heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), spec, ctx)
        self.wo = RowParallelLinear(heads * cfg.v_head_dim, h, spec, ctx)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, H*(nope+rope))
        return q.view(*x.shape[:2], self.n_heads, self.nope + self.rope)  # (B, T, H, nope+rope)

    def forward(self, x: torch.Tensor, start_pos: int, rotary: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Attend from x's tokens (absolute positions start_pos…) to every cached and new token.

        Args:
            x: (B, T, hidden).
            start_pos: absolute position of x[:, 0].
            rotary: complex (T, rope/2) rotations for positions [start_pos, start_pos + T), or
                (B, T, rope/2) per-row rotations (rows at different positions, e.g. left-padded).
            mask: additive (T, S) or (B, 1, T, S) mask over keys [0, S = start_pos + T), or None.
            cache: this layer's latent cache (None: attend within x only; start_pos must be 0).
            last_only: every token's latent is computed (and cached), but only the last token
                attends: the output is (B, 1, hidden). The last row equals that of a full call.

        Returns:
            (B, T, hidden), or (B, 1, hidden) with last_only.
        """
        bsz, t, _ = x.shape
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)  # (B, T, c), (B, T, rope)
        kv = self.kv_norm(kv)
        k_pe = _rotate(k_pe, rotary)  # one rope key shared by all heads
        if last_only and t > 1:
            x, rotary = x[:, -1:], rotary[..., -1:, :]  # (B, 1, hidden), (.., 1, rope/2)
            if mask is not None:
                mask = mask[..., -1:, :]  # (1, S) or (B, 1, 1, S)
                mask = None if mask.dim() == 2 else mask  # the last query of a plain causal chunk sees every key
            t = 1
        q = self._queries(x)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # (B, T, H, nope), (B, T, H, rope)
        q_pe = _rotate(q_pe, rotary)
        if cache is not None:
            kv, k_pe = cache.update(start_pos, kv, k_pe)  # (B, S, c), (B, S, rope)
        elif start_pos:
            raise ValueError("start_pos > 0 needs a cache")
        if self.batch_invariant:
            out = self._per_query(q_nope, q_pe, kv, k_pe, mask)
        elif self.mode == "naive" or (self.mode == "auto" and t > 1):
            out = self._naive(q_nope, q_pe, kv, k_pe, mask)
        else:
            out = self._absorbed(q_nope, q_pe, kv, k_pe, mask)
        return self.wo(out.flatten(2))  # (B, T, H*v) → (B, T, hidden)

    @staticmethod
    def _softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """scores (B, T, H, S) → probabilities (fp32 softmax) in `dtype`; masked chunks go through _sdpa."""
        return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fused softmax(q·kᵀ·scale + mask)·v for multi-token chunks (no (T, H, S) score tensor).

        q (B, T, H, D), k (B, S, H|1, D), v (B, S, H|1, Dv ≤ D); a single K/V head is shared by all
        heads (the absorbed latent). mask: additive (T, S) or (B, 1, T, S). Returns (B, T, H, Dv).
        v is zero-padded to D: the CPU flash kernel needs equal q/k/v head dims.
        """
        bsz, t, heads, d = q.shape
        s, dv = k.shape[1], v.shape[-1]
        if dv < d:
            v = F.pad(v, (0, d - dv))  # (B, S, H|1, D)
        k = k.transpose(1, 2).expand(bsz, heads, s, d)  # (B, H, S, D)
        v = v.transpose(1, 2).expand(bsz, heads, s, d)  # (B, H, S, D)
        if mask.dim() == 2 and mask.shape[0] == mask.shape[1]:  # plain causal from slot 0: skip masked blocks
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask.to(q.dtype),
                                                 scale=self.scale)  # (B, H, T, D)
        return out.transpose(1, 2)[..., :dv]  # (B, T, H, Dv)

    def _naive(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        bsz, s, _ = kv.shape
        kvb = self.wkv_b(kv).view(bsz, s, self.n_heads, self.nope + self.v_dim)  # (B, S, H, nope+v)
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)  # (B, S, H, nope), (B, S, H, v)
        if mask is not None:  # multi-token chunk: fused attention
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(bsz, s, self.n_heads, self.rope)], -1)  # (B, S, H, nope+rope)
            return self._sdpa(torch.cat([q_nope, q_pe], -1), k, v, mask)  # (B, T, H, v)
        scores = (torch.einsum("bthd,bshd->bths", q_nope, k_nope)
                  + torch.einsum("bthr,bsr->bths", q_pe, k_pe)) * self.scale  # (B, T, H, S)
        probs = self._softmax(scores, q_nope.dtype)
        return torch.einsum("bths,bshd->bthd", probs, v)  # (B, T, H, v)

    def _per_query(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        """Batch-invariant absorbed attention: each query attends over exactly the keys its mask
        allows (gathered, so padding and future keys never enter a reduction) with fixed-shape ops,
        so its output is bit-identical alone, in a batch, in a chunk or in a one-shot prefill.

        Args as for `_absorbed`; returns (B, T, H, v).
        """
        w = self.wkv_b.dense_weight(q_nope.dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # (H, nope, c), (H, v, c)
        bsz, t = q_nope.shape[:2]
        out = q_nope.new_empty(bsz, t, self.n_heads, self.v_dim)  # (B, T, H, v)
        for b in range(bsz):
            for i in range(t):
                if mask is None:
                    keys = slice(None)
                else:
                    row = mask[i] if mask.dim() == 2 else mask[b, 0, i]  # (S,) additive: 0 where allowed
                    keys = (row == 0).nonzero().squeeze(1)  # (S',) the allowed keys, in order
                c, r = kv[b, keys], k_pe[b, keys]  # (S', c), (S', rope)
                q_lat = torch.einsum("hd,hdc->hc", q_nope[b, i], w_uk)  # (H, c)
                scores = (q_lat @ c.T + q_pe[b, i] @ r.T) * self.scale  # (H, S')
                probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)  # (H, S')
                out[b, i] = torch.einsum("hc,hvc->hv", probs @ c, w_uv)  # (H, v)
        return out

    def _absorbed(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        w = self.wkv_b.dense_weight(q_nope.dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # (H, nope, c), (H, v, c)
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, c)
        if q_lat.shape[1] == 1 and ops.resolve_backend(self.backend, kv.device) == "triton":
            starts = _key_starts(mask)
            if mask is None or starts is not None:
                # one-token decode, each row over its own keys [start, S) (left padding): the
                # split-K flash-decoding kernel
                lens = torch.full((kv.shape[0],), kv.shape[1], dtype=torch.int32, device=kv.device)  # (B,)
                o_lat = ops.mla_decode(q_lat[:, 0], q_pe[:, 0], kv, k_pe, lens, self.scale, backend="triton",
                                       cache_starts=starts)  # (B, H, c)
                return torch.einsum("bhc,hvc->bhv", o_lat.to(q_lat.dtype), w_uv).unsqueeze(1)  # (B, 1, H, v)
        if mask is not None:  # multi-token chunk: fused attention, one latent K/V head shared by all heads
            k = torch.cat([kv, k_pe], -1).unsqueeze(2)  # (B, S, 1, c+rope); its first c columns are the values
            o_lat = self._sdpa(torch.cat([q_lat, q_pe], -1), k, k, mask)[..., : self.kv_lora_rank]  # (B, T, H, c)
            return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, v)
        scores = (torch.einsum("bthc,bsc->bths", q_lat, kv)
                  + torch.einsum("bthr,bsr->bths", q_pe, k_pe)) * self.scale  # (B, T, H, S)
        probs = self._softmax(scores, q_nope.dtype)
        o_lat = torch.einsum("bths,bsc->bthc", probs, kv)  # (B, T, H, c)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, v)
