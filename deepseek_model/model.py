"""The whole network, top to bottom: Block, MTP, Transformer (and the per-layer latent Cache)."""

from __future__ import annotations

import torch
from torch import nn

from deepseek_model.attention import MLA, LatentCache
from deepseek_model.config import ModelConfig
from deepseek_model.layers import Linear, LinearSpec, ParallelEmbedding, ParallelHead, RMSNorm
from deepseek_model.moe import MLP, MoE
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext
from deepseek_model.rope import attention_factor, inv_frequencies, rotary_table


class Cache:
    """Latent caches of every decoder layer, plus one for the MTP block when the model has it.

    Args:
        num_layers: decoder layers.
        mtp: add a cache for the MTP block.
        fp8: store latents as float8 with a per-token scale (see LatentCache).
    """

    def __init__(self, num_layers: int, mtp: bool, fp8: bool = False):
        self.layers = [LatentCache(fp8) for _ in range(num_layers)]
        self.mtp = LatentCache(fp8) if mtp else None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` in every layer (drop finished sequences)."""
        for c in self.layers + ([self.mtp] if self.mtp else []):
            c.select(rows)

    def nbytes(self) -> int:
        """Bytes held by all layer caches (the MTP cache included)."""
        return sum(c.nbytes() for c in self.layers) + (self.mtp.nbytes() if self.mtp else 0)


def causal_mask(t: int, start_pos: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Additive mask (T, start_pos + T): query i (position start_pos + i) sees keys 0..start_pos + i."""
    if t == 1:
        return None
    return torch.full((t, start_pos + t), float("-inf"), dtype=dtype, device=device).triu_(start_pos + 1)


def row_mask(valid: torch.Tensor, t: int, start_pos: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, T, S) from per-row key validity (S = start_pos + T).

    Query slot q = start_pos + i of row b sees key slot s when s <= q and (valid[b, s] or s == q):
    invalid slots (left padding, rejected draft tokens) are hidden from every other query, and a
    query always sees itself so padded rows stay finite.
    """
    s = valid.shape[1]
    q_slot = torch.arange(start_pos, start_pos + t, device=valid.device).unsqueeze(-1)  # (T, 1)
    k_slot = torch.arange(s, device=valid.device)  # (S,)
    allowed = (k_slot <= q_slot) & (valid.unsqueeze(1) | (k_slot == q_slot))  # (B, T, S)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill_(~allowed, float("-inf"))
    return mask.unsqueeze(1)  # (B, 1, T, S)


def row_rotary(inv_freq: torch.Tensor, positions: torch.Tensor, magnitude: float) -> torch.Tensor:
    """Per-row rotations (B, T, rope/2) complex64 for logical positions (B, T), as rotary_table."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.float()  # (B, T, rope/2)
    return torch.polar(torch.full_like(angles, magnitude), angles)


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then x + FFN(norm(x)); FFN is dense or MoE."""

    def __init__(self, layer_idx: int, cfg: ModelConfig, spec: LinearSpec, ctx: ParallelContext, attn: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype, spec.device)
        self.attn = MLA(cfg, spec, ctx, attn)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype, spec.device)
        self.ffn = MoE(cfg, spec, ctx) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size,
                                                                               spec, ctx)

    def forward(self, x: torch.Tensor, start_pos: int, rotary: torch.Tensor, mask: torch.Tensor | None,
                cache: LatentCache | None, last_only: bool = False) -> torch.Tensor:
        """(B, T, hidden) → (B, T, hidden); with last_only every token is cached but only the last
        one's output is computed: (B, 1, hidden)."""
        h = self.attn(self.attn_norm(x), start_pos, rotary, mask, cache, last_only)  # (B, T or 1, hidden)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.ffn(self.ffn_norm(x))


class MTP(nn.Module):
    """Multi-token prediction module (depth 1), stored as layer `num_hidden_layers`.

    Row i combines the main model's final (normed) hidden h_i with the embedding of token i+1 —
    embedding first: x = eh_proj([enorm(e_{i+1}) ; hnorm(h_i)]) — runs one decoder block, and
    predicts token i+2 with its own norm and head.
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec, ctx: ParallelContext, attn: str):
        super().__init__()
        dtype, device = spec.dtype, spec.device
        self.embed = ParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, device, ctx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, spec, fp8=False)
        self.block = Block(cfg.mtp_layer_index, cfg, spec, ctx, attn)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.head = ParallelHead(cfg.hidden_size, cfg.vocab_size, dtype, device, ctx)

    def forward(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int, rotary: torch.Tensor,
                mask: torch.Tensor | None, cache: LatentCache | None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) fp32 for tokens two ahead ((B, 1, V) for the last row with last_only).

        Args:
            h: (B, T, hidden) main-model hidden states after the final norm, positions start_pos…
            next_ids: (B, T) the token following each of those positions.
            start_pos, rotary, mask, cache: as for Block.
            last_only: every row is cached, but attention output, FFN and head run for the last row
                only (a drafter needs no other): (B, 1, V).
        """
        x = torch.cat([self.enorm(self.embed(next_ids)), self.hnorm(h)], dim=-1)  # (B, T, 2·hidden)
        x = self.block(self.eh_proj(x), start_pos, rotary, mask, cache, last_only)  # (B, T or 1, hidden)
        return self.head(self.norm(x))


class Transformer(nn.Module):
    """DeepSeek-V2/V3 causal LM: embedding, decoder blocks, final norm, head, optional MTP.

    Args:
        cfg: the checkpoint's config.
        spec: how linears store/run weights (dtype, device, fp8, backend).
        ctx: parallel context (single process by default).
        attn: "absorb" (latent-space attention, default) or "naive".
        mtp: build the MTP module when the config has one.
        max_seq_len: longest sequence accepted (default: config max_position_embeddings).
    """

    def __init__(self, cfg: ModelConfig, spec: LinearSpec | None = None, ctx: ParallelContext = SINGLE_PROCESS,
                 attn: str = "absorb", mtp: bool = True, max_seq_len: int | None = None):
        super().__init__()
        spec = spec or LinearSpec()
        self.cfg, self.spec, self.ctx = cfg, spec, ctx
        self.max_seq_len = max_seq_len or cfg.max_position_embeddings
        self.embed = ParallelEmbedding(cfg.vocab_size, cfg.hidden_size, spec.dtype, spec.device, ctx)
        self.layers = nn.ModuleList(Block(i, cfg, spec, ctx, attn) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, spec.dtype, spec.device)
        self.head = ParallelHead(cfg.hidden_size, cfg.vocab_size, spec.dtype, spec.device, ctx)
        self.mtp = MTP(cfg, spec, ctx, attn) if mtp and cfg.num_nextn_predict_layers else None
        self.register_buffer("inv_freq", inv_frequencies(cfg).to(spec.device), persistent=False)
        self.rope_magnitude = attention_factor(cfg)

    @property
    def has_mtp(self) -> bool:
        """Whether the MTP module is present."""
        return self.mtp is not None

    def new_cache(self, fp8: bool = False) -> Cache:
        """An empty latent cache; it grows as tokens are written (fp8: float8 latents, per-token scale)."""
        return Cache(len(self.layers), self.has_mtp, fp8)

    def _check_input(self, input_ids: torch.Tensor, start_pos: int) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"input_ids contain a token id outside [0, vocab_size={self.cfg.vocab_size})")
        end = start_pos + input_ids.shape[1]
        if start_pos < 0 or end > self.max_seq_len:
            raise ValueError(f"positions [{start_pos}, {end}) exceed max_seq_len {self.max_seq_len}")

    def _rotary_and_mask(self, t: int, start_pos: int, positions: torch.Tensor | None = None,
                         valid: torch.Tensor | None = None, bsz: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        if positions is None:
            rotary = rotary_table(self.inv_freq, start_pos, t, self.rope_magnitude)  # (T, rope/2)
        else:
            if tuple(positions.shape) != (bsz, t):
                raise ValueError(f"positions must have shape {(bsz, t)}, got {tuple(positions.shape)}")
            rotary = row_rotary(self.inv_freq, positions.to(self.inv_freq.device), self.rope_magnitude)  # (B, T, rope/2)
        if valid is None:
            return rotary, causal_mask(t, start_pos, self.spec.dtype, self.inv_freq.device)
        if tuple(valid.shape) != (bsz, start_pos + t) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool tensor of shape {(bsz, start_pos + t)}, got "
                             f"{valid.dtype} {tuple(valid.shape)}")
        return rotary, row_mask(valid.to(self.inv_freq.device), t, start_pos, self.spec.dtype)

    def hidden(self, input_ids: torch.Tensor, start_pos: int = 0, cache: Cache | None = None, *,
               positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states after the last norm: (B, T, hidden).

        Args:
            input_ids: (B, T) token ids, written at cache slots [start_pos, start_pos + T).
            start_pos: first cache slot.
            cache: the latent cache (None: plain causal prefill from slot 0).
            positions: optional (B, T) RoPE positions per row (default start_pos + arange(T));
                rows whose slots are offset by left padding or rejected drafts pass their own.
            valid: optional (B, start_pos + T) bool: which key slots may be attended (default all).
        """
        self._check_input(input_ids, start_pos)
        rotary, mask = self._rotary_and_mask(input_ids.shape[1], start_pos, positions, valid, input_ids.shape[0])
        x = self.embed(input_ids)  # (B, T, hidden)
        for i, layer in enumerate(self.layers):
            x = layer(x, start_pos, rotary, mask, cache.layers[i] if cache is not None else None)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: Cache | None = None, *,
                positions: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32.

        Without a cache this is a full causal prefill (start_pos must be 0); with a cache, tokens
        are written at positions [start_pos, start_pos + T) and attend to everything before.
        `positions` / `valid` as for `hidden` (per-row positions and key validity).
        """
        return self.head(self.hidden(input_ids, start_pos, cache, positions=positions, valid=valid))

    def mtp_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """MTP predictions (B, T-1, vocab) fp32: row i uses h_i and token i+1 and predicts token i+2."""
        if self.mtp is None:
            raise ValueError("this model has no MTP module (checkpoint without it, or loaded with mtp=False)")
        h = self.hidden(input_ids)  # (B, T, hidden)
        t = input_ids.shape[1] - 1
        rotary, mask = self._rotary_and_mask(t, 0)
        return self.mtp(h[:, :-1], input_ids[:, 1:], 0, rotary, mask, None)

    def mtp_step(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int, cache: Cache, *,
                 positions: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                 last_only: bool = False) -> torch.Tensor:
        """MTP logits for positions [start_pos, start_pos + T) using the MTP block's cache.

        Args:
            h: (B, T, hidden) main hidden states (after norm) at those positions.
            next_ids: (B, T) the tokens that follow them.
            start_pos: position of h[:, 0].
            cache: the model cache (its `mtp` layer is used).
            positions, valid: per-row positions and key validity, as for `hidden`.
            last_only: logits (B, 1, V) of the last position only (every position is still cached).
        """
        if self.mtp is None:
            raise ValueError("this model has no MTP module")
        rotary, mask = self._rotary_and_mask(h.shape[1], start_pos, positions, valid, h.shape[0])
        return self.mtp(h, next_ids, start_pos, rotary, mask, cache.mtp, last_only)
