"""Multi-head Latent Attention (MLA): naive and weight-absorbed forward over one latent cache,
dense (DeepSeek-V2/V3) or sparse over the tokens a lightning indexer selects (DeepSeek-V3.2).

Per token and layer the cache holds the normalised KV latent c (kv_lora_rank values) and the
post-RoPE shared key k_rope (qk_rope_head_dim values): 576 numbers for DeepSeek-V3, shared by all
heads; a V3.2 layer also caches one index key per token (IndexKeyCache). The naive path expands the
latents to per-head keys/values with kv_b; the absorbed path folds kv_b into the query and the
output instead (equal to fp32 round-off). With an indexer, a query whose context holds more than
index_topk tokens attends to the selected ones only: the absorbed path gathers their latents (work
∝ index_topk, not context), the naive path masks the others, and "auto" splits a long chunk where
gathering gets cheaper than masking (GATHER_PENALTY); up to index_topk tokens of context, every
visible token is selected and the layer runs exactly the dense computation, unscored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_model.config import ModelConfig
from deepseek_model.constants import FP8_DTYPE, FP8_MAX
from deepseek_model.indexer import Indexer
from deepseek_model.kernels import cpu_pack, ops
from deepseek_model.kernels.cpu_pack import Snapshot
from deepseek_model.layers import ColumnParallelLinear, Linear, LinearSpec, RMSNorm, RowParallelLinear
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext
from deepseek_model.rope import apply_rotary

ATTN_MODES = ("absorb", "naive", "auto")  # auto: naive for multi-token chunks (prefill), absorbed for decode
GROWTH = 2  # the cache grows geometrically: amortised O(1) copies per token
FP8_SCALE_MIN = 1e-12  # keeps the per-token scale of an all-zero latent finite
# A naive multi-token chunk over at most GEMM_ATTENTION_MAX_KEYS keys attends with two plain GEMMs
# per GEMM_ATTENTION_QUERIES queries and batch row (scores in fp32) instead of the fused kernel,
# which pads v to the q/k width on the CPU: 1 thread, small config, fp32 / bf16 prefill tokens/s
# +4% / +9% at 128 tokens, +5% / +18% at 1024, and +9% / +10% at 128 tokens x batch 8 (one row at
# a time, so that a row's scores stay in cache). At 4096 keys the fused kernel was as fast (dense)
# or faster (sparse V3.2 chunks) and keeps the scores out of memory.
GEMM_ATTENTION_MAX_KEYS = 2048
GEMM_ATTENTION_QUERIES = 128
SPARSE_PREFILL_CHUNK = 256  # queries per masked-attention call of a sparse prefill (causal key cut per chunk)
NARROW_QUERY_ROWS = 4  # absorbed attention of at most this many query rows: per-head float32 W·qᵀ (packed copies)
# sparse absorbed attention gathers the selected latents of this many bytes of queries at once: small
# enough that its GEMMs read them back from cache (1 thread, small config, 256 of 4096 / 8192 keys
# selected: 0.76 -> 0.64 s / 1.55 -> 1.25 s a layer against 64 MiB; 0.5 MiB was slower again)
GATHER_BYTES = 4 << 20
# A gathered (absorbed) query-key pair costs this many times its FLOPs relative to a pair of the fused
# masked kernel: `bench model` measures it on the `small` config (one AVX-512 core, fp32, 16 heads, 256
# of 8192 keys selected): 1.56 with 4 MiB gathers (2.1-3.8 with the 64 MiB ones before). Sets where
# "auto" starts gathering (~3.6 x index_topk keys at that config's dims).
GATHER_PENALTY = 1.6
INDEX_SCORE_BYTES = 64 << 20  # a long prefill scores this many bytes of (query, key) index logits at once


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


def _with_capacity(old: torch.Tensor | None, bsz: int, capacity: int, width: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device, fill: float = 0.0) -> torch.Tensor:
    """A (B, capacity, *width) tensor holding `old`'s slots first and `fill` after them."""
    new = torch.zeros(bsz, capacity, *width, dtype=dtype, device=device)
    if fill:
        new.fill_(fill)
    if old is not None:
        new[:, : old.shape[1]] = old
    return new


def _check_write(name: str, held_batch: int | None, length: int, start_pos: int, bsz: int) -> None:
    """The rules every cache write follows (one batch size; no gap before start_pos)."""
    if held_batch is not None and held_batch != bsz:
        raise ValueError(f"{name} holds batch size {held_batch}, got a batch of {bsz}")
    if held_batch is None and start_pos > 0:
        raise ValueError(f"start_pos {start_pos} > 0 but the {name} is empty (prefill from position 0 first)")
    if start_pos > length:
        raise ValueError(f"start_pos {start_pos} is past the {length} cached positions (positions "
                         f"[{length}, {start_pos}) were never written; continue at start_pos {length})")


class IndexKeyCache:
    """One layer's cache of DeepSeek-V3.2 index keys, written at the same positions as its latents
    (so a speculative rollback of the latent cache rolls these back too).

    Attributes:
        keys: (B, capacity, index_head_dim) rotated keys: compute dtype, or float8_e4m3fn (fp8).
        scale: (B, capacity) fp32 per-token dequantization scale (fp8 only).

    Args:
        fp8: hold keys as e4m3 with one scale per token (as DeepSeek's inference kernels do);
            otherwise exact in the compute dtype.
    """

    def __init__(self, fp8: bool = False) -> None:
        self.fp8 = fp8
        self.length = 0
        self.keys: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.scale) if t is not None)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows`."""
        if self.keys is not None:
            self.keys = self.keys[rows]
            self.scale = None if self.scale is None else self.scale[rows]

    def update(self, start_pos: int, keys: torch.Tensor,
               scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write positions [start_pos, start_pos + T); return keys (B, S, D) and scales (B, S) of [0, S).

        Args:
            start_pos: first position written.
            keys: (B, T, D): float8 with `scale` (B, T) in fp8 mode, else float with scale None.
        """
        bsz, t, d = keys.shape
        if (scale is not None) != self.fp8 or (self.fp8 and keys.dtype != FP8_DTYPE):
            raise ValueError(f"index cache (fp8={self.fp8}) got keys of dtype {keys.dtype} "
                             f"{'with' if scale is not None else 'without'} scales")
        _check_write("index-key cache", None if self.keys is None else self.keys.shape[0], self.length, start_pos,
                     bsz)
        end = start_pos + t
        capacity = 0 if self.keys is None else self.keys.shape[1]
        if end > capacity:
            capacity = max(end, GROWTH * capacity)
            self.keys = _with_capacity(self.keys, bsz, capacity, (d,), keys.dtype, keys.device)
            if self.fp8:
                self.scale = _with_capacity(self.scale, bsz, capacity, (), torch.float32, keys.device, 1.0)
        self.keys[:, start_pos:end] = keys
        if self.fp8:
            self.scale[:, start_pos:end] = scale
        self.length = end
        return self.keys[:, :end], None if scale is None else self.scale[:, :end]


def _visible_positions(mask: torch.Tensor | None, bsz: int, t: int, s: int, device: torch.device) -> torch.Tensor:
    """(B, T, S) key positions 0…S-1 where an additive (T, S) or (B, 1, T, S) mask allows them (None:
    all), -1 elsewhere: the selection of queries that see at most index_topk keys."""
    pos = torch.arange(s, device=device).expand(bsz, t, s)  # (B, T, S)
    if mask is None:
        return pos
    allowed = (mask if mask.dim() == 2 else mask[:, 0]) == 0  # (T, S) or (B, T, S)
    return torch.where(allowed, pos, -1)  # (B, T, S)


def _visible(mask: torch.Tensor | None, b: int, i: int, s: int, device: torch.device) -> torch.Tensor:
    """Key positions (S',) query i of row b may attend to, ascending, under an additive (T, S) or
    (B, 1, T, S) mask (None: all S)."""
    if mask is None:
        return torch.arange(s, device=device)
    row = mask[i] if mask.dim() == 2 else mask[b, 0, i]  # (S,) additive: 0 where allowed
    return (row == 0).nonzero().squeeze(1)


class LatentCache:
    """One layer's latent KV cache: grows with use, never preallocated to max_seq_len.

    Attributes:
        kv: (B, capacity, kv_lora_rank) normalised latents (float8_e4m3fn when fp8).
        pe: (B, capacity, qk_rope_head_dim) post-RoPE shared keys (always in the compute dtype).
        kv_scale: (B, capacity, 1) fp32 per-token dequantization scale of kv (fp8 only).

        index: the layer's index-key cache (DeepSeek-V3.2), or None.

    Args:
        fp8: store the latent as float8_e4m3fn with one fp32 scale per token (amax / FP8_MAX); the rope
            keys stay in the compute dtype.
        index: an IndexKeyCache for a layer with a lightning indexer.
    """

    def __init__(self, fp8: bool = False, index: IndexKeyCache | None = None) -> None:
        self.fp8 = fp8
        self.length = 0  # positions [0, length) hold written tokens
        self.kv: torch.Tensor | None = None
        self.pe: torch.Tensor | None = None
        self.kv_scale: torch.Tensor | None = None
        self.index = index

    @property
    def capacity(self) -> int:
        """Positions allocated so far."""
        return 0 if self.kv is None else self.kv.shape[1]

    def nbytes(self) -> int:
        """Bytes held by this layer's cache."""
        held = (self.kv, self.pe, self.kv_scale)
        return sum(t.numel() * t.element_size() for t in held if t is not None) + (
            self.index.nbytes() if self.index is not None else 0)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (1-D index tensor), e.g. to drop finished sequences."""
        if self.kv is not None:
            self.kv, self.pe = self.kv[rows], self.pe[rows]
            if self.kv_scale is not None:
                self.kv_scale = self.kv_scale[rows]
        if self.index is not None:
            self.index.select(rows)

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
        _check_write("cache", None if self.kv is None else self.kv.shape[0], self.length, start_pos, bsz)
        if end > self.capacity:
            cap = max(end, GROWTH * self.capacity)
            self.kv = _with_capacity(self.kv, bsz, cap, kv.shape[-1:], FP8_DTYPE if self.fp8 else kv.dtype, kv.device)
            self.pe = _with_capacity(self.pe, bsz, cap, pe.shape[-1:], pe.dtype, pe.device)
            if self.fp8:
                self.kv_scale = _with_capacity(self.kv_scale, bsz, cap, (1,), torch.float32, kv.device, 1.0)
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


@dataclass(frozen=True)
class AbsorbedWeights:
    """kv_b's up-projections laid out for absorbed attention (MLA.pack).

    Attributes:
        w_uk: (H, nope, c) contiguous.
        w_uv_t: (H, c, v) contiguous (w_uv transposed).
        narrow_uk: (H, c, nope) float32 contiguous (w_uk transposed), for a few query rows.
        narrow_uv: (H, v, c) float32 contiguous, for a few query rows.
        origin: the kv_b weight they were copied from.
    """

    w_uk: torch.Tensor
    w_uv_t: torch.Tensor
    narrow_uk: torch.Tensor
    narrow_uv: torch.Tensor
    origin: Snapshot

    def __deepcopy__(self, memo: dict) -> None:
        """A deep copy of a packed model is unpacked: these copies would never serve the copied
        weights (their snapshot names the originals), so they are not carried; pack the copy again."""
        return None


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
        self.indexer = Indexer(cfg, spec) if cfg.has_indexer else None  # replicated on every rank
        self.absorbed: AbsorbedWeights | None = None  # made by pack()

    def pack(self) -> int:
        """Contiguous per-head copies of kv_b's up-projections, w_uk (H, nope, c) and w_uvᵀ (H, c, v),
        the operands of absorbed attention in the layout its batched GEMMs read without a copy (a
        view of the weight is copied into that layout on every call: 0.1–0.3 ms a layer per
        bfloat16 decode step on the bench's small config), plus float32 copies laid out for a few
        query rows (see _absorb_queries). Returns the bytes allocated (0 for an fp8 kv_b or in
        batch-invariant mode)."""
        w = self.wkv_b.weight
        if not self.pack_nbytes():
            return 0
        full = w.detach().view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)  # (H, nope+v, c)
        w_uk, w_uv = full.split([self.nope, self.v_dim], dim=1)  # (H, nope, c), (H, v, c)
        self.absorbed = AbsorbedWeights(w_uk.contiguous(), w_uv.transpose(1, 2).contiguous(),
                                        w_uk.transpose(1, 2).float().contiguous(), w_uv.float().contiguous(),
                                        Snapshot.of((w,)))
        return self.pack_nbytes()

    def pack_nbytes(self) -> int:
        """Bytes pack() allocates: kv_b once in its dtype and once in float32 (0 where it packs nothing)."""
        w = self.wkv_b.weight
        if self.batch_invariant or self.wkv_b.is_fp8 or not cpu_pack.packable(w):
            return 0
        return w.numel() * (w.element_size() + 4)

    def _up_projections(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_uk (H, nope, c), w_uv (H, v, c)) of kv_b in `dtype`: views of pack()'s contiguous
        copies while they still hold the weight (and no gradient is wanted), else of the weight."""
        a = self.absorbed
        if a is not None and a.w_uk.dtype == dtype and a.origin.usable():
            return a.w_uk, a.w_uv_t.transpose(1, 2)
        w = self.wkv_b.dense_weight(dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w.split([self.nope, self.v_dim], dim=1)

    def _narrow_copies(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """pack()'s float32 (H, c, nope) and (H, v, c) copies while they still hold kv_b and no
        gradient is wanted, else None."""
        a = self.absorbed
        if a is None or not a.origin.usable():
            return None
        return a.narrow_uk, a.narrow_uv

    def _absorb_queries(self, q_nope: torch.Tensor) -> torch.Tensor:
        """Per-head query latents q_nope·w_uk: (B, T, H, nope) → (B, T, H, c).

        With at most NARROW_QUERY_ROWS query rows and packed copies, each head runs W·qᵀ in float32
        (a batched GEMM with a narrow right-hand side streams the weight once; the (rows, nope) x
        (nope, c) form measured 1.5–2.7x slower at 1–4 rows in float32, and bfloat16 per-head
        products of one row ran at half the float32 speed)."""
        bsz, t, heads, _ = q_nope.shape
        narrow = self._narrow_copies() if bsz * t <= NARROW_QUERY_ROWS else None
        if narrow is None:
            w_uk, _ = self._up_projections(q_nope.dtype)  # (H, nope, c)
            return torch.einsum("bthd,hdc->bthc", q_nope, w_uk)  # (B, T, H, c)
        return _per_head_narrow(q_nope, narrow[0])  # (B, T, H, c)

    def _expand_values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Per-head outputs o_lat·w_uvᵀ: (B, T, H, c) → (B, T, H, v); a few rows as in _absorb_queries."""
        bsz, t = o_lat.shape[:2]
        narrow = self._narrow_copies() if bsz * t <= NARROW_QUERY_ROWS else None
        if narrow is None:
            _, w_uv = self._up_projections(o_lat.dtype)  # (H, v, c)
            return torch.einsum("bthc,hvc->bthv", o_lat, w_uv)  # (B, T, H, v)
        return _per_head_narrow(o_lat, narrow[1])  # (B, T, H, v)

    def _queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries (B, T, H, nope+rope) and the normalised query latent (B, T, q_lora_rank) (None without q LoRA)."""
        if hasattr(self, "wq"):
            q, latent = self.wq(x), None  # (B, T, H*(nope+rope))
        else:
            latent = self.q_norm(self.wq_a(x))  # (B, T, q_lora_rank)
            q = self.wq_b(latent)  # (B, T, H*(nope+rope))
        return q.view(*x.shape[:2], self.n_heads, self.nope + self.rope), latent  # (B, T, H, nope+rope)

    def _index_keys(self, x: torch.Tensor, rotary: torch.Tensor, start_pos: int,
                    cache: LatentCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This chunk's index keys written to the cache; the keys (B, S, D) and scales of every
        cached position (float keys and no scales without a cache)."""
        keys = self.indexer.keys(x, rotary)  # (B, T, D)
        if cache is None:
            return keys, None
        if cache.index is None:
            raise ValueError("this layer has a lightning indexer, but its cache holds no index keys "
                             "(make caches with model.new_cache())")
        if cache.index.fp8:
            return cache.index.update(start_pos, *self.indexer.quantize(keys))  # (B, S, D) fp8, (B, S)
        return cache.index.update(start_pos, keys, None)

    def _select_chunked(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_scale: torch.Tensor | None,
                        mask: torch.Tensor | None) -> torch.Tensor:
        """Top-k selection of a chunk's queries q (B, T, Hi, Di) against keys (B, S, Di), in query
        blocks of at most SPARSE_PREFILL_CHUNK queries and INDEX_SCORE_BYTES of scores, each over the
        keys up to its last query only (the causal rest cannot be selected): bounded memory and half
        the work of a long prefill. A block whose keys number at most index_topk selects every
        visible key without being scored. Returns (B, T, index_topk), -1 = none."""
        bsz, t = q.shape[:2]
        s, topk = keys.shape[1], self.indexer.topk
        first = s - t  # query i sits at slot first + i
        step = max(1, min(SPARSE_PREFILL_CHUNK, INDEX_SCORE_BYTES // (4 * bsz * s)))
        if step >= t:
            return self.indexer.select(self.indexer.scores(q, w, keys, key_scale, mask))  # (B, T, K)
        out = torch.full((bsz, t, topk), -1, dtype=torch.int64, device=q.device)  # (B, T, K)
        for lo in range(0, t, step):
            hi = min(t, lo + step)
            end = first + hi  # keys a later slot holds are hidden from every query of this block
            part = None if mask is None else (mask[lo:hi, :end] if mask.dim() == 2 else mask[:, :, lo:hi, :end])
            if end <= topk:
                chosen = _visible_positions(part, bsz, hi - lo, end, q.device)  # (B, t', end)
            else:
                scale = None if key_scale is None else key_scale[:, :end]
                chosen = self.indexer.select(self.indexer.scores(q[:, lo:hi], w[:, lo:hi], keys[:, :end], scale, part))
            out[:, lo:hi, topk - chosen.shape[-1]:] = chosen  # (B, t', K'): K' = min(K, end)
        return out

    def _selection(self, q_latent: torch.Tensor, x: torch.Tensor, rotary: torch.Tensor, keys: torch.Tensor,
                   key_scale: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(B, T, index_topk) selected key positions per query (ascending, -1 = none), or None when
        the context holds at most index_topk keys (then every visible key is selected: dense MLA)."""
        if keys.shape[1] <= self.indexer.topk:
            return None
        q, w = self.indexer.queries(q_latent, x, rotary)  # (B, T, Hi, Di), (B, T, Hi)
        if not self.batch_invariant:
            return self._select_chunked(q, w, keys, key_scale, mask)  # (B, T, K)
        # batch-invariant: each query scores exactly its visible keys, alone
        bsz, t = q.shape[:2]
        out = torch.full((bsz, t, self.indexer.topk), -1, dtype=torch.int64, device=q.device)  # (B, T, K)
        for b in range(bsz):
            for i in range(t):
                visible = _visible(mask, b, i, keys.shape[1], keys.device)  # (S',)
                scale = None if key_scale is None else key_scale[b:b + 1, visible]  # (1, S')
                sc = self.indexer.scores(q[b:b + 1, i:i + 1], w[b:b + 1, i:i + 1], keys[b:b + 1, visible], scale,
                                         None)  # (1, 1, S')
                chosen = self.indexer.select(sc, ordered=True)[0, 0]  # (K',) into `visible`, ascending
                picked = visible[chosen[chosen >= 0]]
                out[b, i, out.shape[-1] - picked.numel():] = picked
        return out

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
        if start_pos and cache is None:
            raise ValueError("start_pos > 0 needs a cache")
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)  # (B, T, c), (B, T, rope)
        kv = self.kv_norm(kv)
        k_pe = _rotate(k_pe, rotary)  # one rope key shared by all heads
        if self.indexer is not None:  # every token's index key is cached, before last_only drops rows
            index_keys, index_scale = self._index_keys(x, rotary, start_pos, cache)
        if last_only and t > 1:
            x, rotary = x[:, -1:], rotary[..., -1:, :]  # (B, 1, hidden), (.., 1, rope/2)
            if mask is not None:
                mask = mask[..., -1:, :]  # (1, S) or (B, 1, 1, S)
                mask = None if mask.dim() == 2 else mask  # the last query of a plain causal chunk sees every key
            t = 1
        q, q_latent = self._queries(x)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # (B, T, H, nope), (B, T, H, rope)
        q_pe = _rotate(q_pe, rotary)
        if cache is not None:
            kv, k_pe = cache.update(start_pos, kv, k_pe)  # (B, S, c), (B, S, rope)
        selected = None
        if self.indexer is not None:
            selected = self._selection(q_latent, x, rotary, index_keys, index_scale, mask)  # (B, T, K) or None
        if self.batch_invariant:
            out = self._per_query(q_nope, q_pe, kv, k_pe, mask, selected)
        elif selected is not None and t > 1:
            out = self._sparse_chunk(q_nope, q_pe, kv, k_pe, mask, selected)
        elif selected is not None and self.mode != "naive":
            out = self._sparse_absorbed(q_nope, q_pe, kv, k_pe, selected)
        elif selected is not None:
            out = self._sparse_naive_step(q_nope, q_pe, kv, k_pe, selected)
        elif self.mode == "naive" or (self.mode == "auto" and t > 1):
            out = self._naive(q_nope, q_pe, kv, k_pe, mask)
        else:
            out = self._absorbed(q_nope, q_pe, kv, k_pe, mask)
        return self.wo(out.flatten(2))  # (B, T, H*v) → (B, T, hidden)

    @staticmethod
    def _softmax(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Scores over the last dim → probabilities (fp32 softmax) in `dtype`; masked chunks go through _sdpa."""
        return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fused softmax(q·kᵀ·scale + mask)·v for multi-token chunks (no (T, H, S) score tensor).

        q (B, T, H, D), k (B, S, H|1, D), v (B, S, H|1, Dv ≤ D); a single K/V head is shared by all
        heads (the absorbed latent). mask: additive (T, S) or (B, 1, T, S). Returns (B, T, H, Dv).
        """
        bsz, t, heads, d = q.shape
        s, dv = k.shape[1], v.shape[-1]
        if dv < d:
            v = F.pad(v, (0, d - dv))  # (B, S, H|1, D)
        k = k.transpose(1, 2).expand(bsz, heads, s, d)  # (B, H, S, D)
        v = v.transpose(1, 2).expand(bsz, heads, s, d)  # (B, H, S, D)
        return self._fused(q, k, v, mask)[..., :dv]  # (B, T, H, Dv)

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The CPU fused kernel: q (B, T, H, d), heads-first keys k (B, H, S, d) and values v
        (B, H, S, D ≥ d), zero-padded to equal widths (q and k are padded to D when the values are
        wider: a zero column adds nothing to a dot product); mask additive (T, S) or (B, 1, T, S).
        Contiguous heads-first keys are read as one run per head (1 thread, 16 heads x 128, 8192
        keys: 3-7 % faster than (B, S, H, d) views). Returns (B, T, H, D)."""
        wide = v.shape[-1]
        if k.shape[-1] < wide:
            q, k = F.pad(q, (0, wide - q.shape[-1])), F.pad(k, (0, wide - k.shape[-1]))  # (.., D)
        qh = q.transpose(1, 2)  # (B, H, T, D)
        if mask.dim() == 2 and mask.shape[0] == mask.shape[1]:  # plain causal from slot 0: skip masked blocks
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask.to(q.dtype), scale=self.scale)  # (B, H, T, D)
        return out.transpose(1, 2)  # (B, T, H, D)

    def _naive(self, q_nope, q_pe, kv, k_pe, mask, causal_chunk: int | None = None,
               selected: torch.Tensor | None = None) -> torch.Tensor:
        """Per-head keys/values expanded from the latents. A masked multi-token chunk attends in
        query blocks (of `causal_chunk` when given, else GEMM_ATTENTION_QUERIES), each over the keys
        up to its last query (the chunk's queries are the last T slots): two GEMMs per block where it
        sees at most GEMM_ATTENTION_MAX_KEYS keys, else the fused kernel (one call for the whole chunk
        without `causal_chunk`); each block also hides the keys its queries did not select when
        `selected` (B, T, K) is given and the block sees more than K keys. Returns (B, T, H, v)."""
        bsz, s, _ = kv.shape
        kvb = self.wkv_b(kv).view(bsz, s, self.n_heads, self.nope + self.v_dim)  # (B, S, H, nope+v)
        k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)  # (B, S, H, nope), (B, S, H, v)
        if mask is not None:  # multi-token chunk
            q = torch.cat([q_nope, q_pe], -1)  # (B, T, H, nope+rope)
            # keys laid out heads-first (contiguous): each head's keys are one run for either kernel
            kh = torch.cat([k_nope.transpose(1, 2), k_pe.unsqueeze(1).expand(bsz, self.n_heads, s, self.rope)],
                           -1)  # (B, H, S, nope+rope)
            t = q.shape[1]
            if causal_chunk is None and s > GEMM_ATTENTION_MAX_KEYS:
                return self._fused(q, kh, _heads_first_padded(v, kh.shape[-1]), mask)[..., :self.v_dim]  # (B, T, H, v)
            vh = padded = None  # the values laid out for each path, made once
            out = q_nope.new_empty(bsz, t, self.n_heads, self.v_dim)  # (B, T, H, v)
            block = causal_chunk or GEMM_ATTENTION_QUERIES
            for lo in range(0, t, block):  # keys past a block's last query (slot s - t + hi - 1) are skipped
                hi = min(t, lo + block)
                end = s - t + hi
                part = mask[..., lo:hi, :end]  # (t', end) or (B, 1, t', end)
                if selected is not None and end > selected.shape[-1]:
                    part = _selection_mask(selected[:, lo:hi], end, q.dtype)  # (B, 1, t', end)
                if end <= GEMM_ATTENTION_MAX_KEYS:
                    if vh is None:
                        vh = v.transpose(1, 2).contiguous()  # (B, H, S, v)
                    for b in range(bsz):  # one row at a time: its scores stay in cache
                        mb = part if part.dim() == 2 else part[b:b + 1]
                        out[b:b + 1, lo:hi] = _gemm_attention(q[b:b + 1, lo:hi].transpose(1, 2), kh[b:b + 1, :, :end],
                                                              vh[b:b + 1, :, :end], mb, self.scale).transpose(1, 2)
                else:
                    if padded is None:
                        padded = _heads_first_padded(v, kh.shape[-1])  # (B, H, S, max(nope+rope, v))
                    out[:, lo:hi] = self._fused(q[:, lo:hi], kh[:, :, :end], padded[:, :, :end], part)[..., :self.v_dim]
            return out
        scores = (torch.einsum("bthd,bshd->bths", q_nope, k_nope)
                  + torch.einsum("bthr,bsr->bths", q_pe, k_pe)) * self.scale  # (B, T, H, S)
        probs = self._softmax(scores, q_nope.dtype)
        return torch.einsum("bths,bshd->bthd", probs, v)  # (B, T, H, v)

    def _per_query(self, q_nope, q_pe, kv, k_pe, mask, selected=None) -> torch.Tensor:
        """Batch-invariant absorbed attention: each query attends over exactly the keys its mask
        allows (gathered, so padding and future keys never enter a reduction) with fixed-shape ops,
        so its output is bit-identical alone, in a batch, in a chunk or in a one-shot prefill.

        Args as for `_absorbed`, plus the indexer's selection (B, T, K) (None: every visible key);
        returns (B, T, H, v).
        """
        w_uk, w_uv = self._up_projections(q_nope.dtype)  # (H, nope, c), (H, v, c)
        bsz, t = q_nope.shape[:2]
        out = q_nope.new_empty(bsz, t, self.n_heads, self.v_dim)  # (B, T, H, v)
        for b in range(bsz):
            for i in range(t):
                if selected is not None:
                    keys = selected[b, i][selected[b, i] >= 0]  # (K',) ascending (selected per query), all visible
                else:
                    keys = _visible(mask, b, i, kv.shape[1], kv.device)  # (S',) the allowed keys, in order
                c, r = kv[b, keys], k_pe[b, keys]  # (S', c), (S', rope)
                q_lat = torch.einsum("hd,hdc->hc", q_nope[b, i], w_uk)  # (H, c)
                scores = (q_lat @ c.T + q_pe[b, i] @ r.T) * self.scale  # (H, S')
                probs = scores.softmax(dim=-1, dtype=torch.float32).to(q_nope.dtype)  # (H, S')
                out[b, i] = torch.einsum("hc,hvc->hv", probs @ c, w_uv)  # (H, v)
        return out

    def _absorbed(self, q_nope, q_pe, kv, k_pe, mask) -> torch.Tensor:
        q_lat = self._absorb_queries(q_nope)  # (B, T, H, c)
        if q_lat.shape[1] == 1 and ops.resolve_backend(self.backend, kv.device) == "triton":
            starts = _key_starts(mask)
            if mask is None or starts is not None:
                # one-token decode, each row over its own keys [start, S) (left padding): the
                # split-K flash-decoding kernel
                lens = torch.full((kv.shape[0],), kv.shape[1], dtype=torch.int32, device=kv.device)  # (B,)
                o_lat = ops.mla_decode(q_lat[:, 0], q_pe[:, 0], kv, k_pe, lens, self.scale, backend="triton",
                                       cache_starts=starts)  # (B, H, c)
                return self._expand_values(o_lat.to(q_lat.dtype).unsqueeze(1))  # (B, 1, H, v)
        if mask is not None:  # multi-token chunk: fused attention, one latent K/V head shared by all heads
            k = torch.cat([kv, k_pe], -1).unsqueeze(2)  # (B, S, 1, c+rope); its first c columns are the values
            o_lat = self._sdpa(torch.cat([q_lat, q_pe], -1), k, k, mask)[..., : self.kv_lora_rank]  # (B, T, H, c)
            return self._expand_values(o_lat)  # (B, T, H, v)
        bsz, t, heads, c = q_lat.shape
        ql = q_lat.reshape(bsz, t * heads, c)  # (B, T·H, c): every query head against the same keys
        qr = q_pe.reshape(bsz, t * heads, self.rope)  # (B, T·H, rope)
        # computed as (kv·qlᵀ)ᵀ: the cache is the left operand as it lies (a bfloat16 GEMM copies a
        # transposed right operand first: 330 vs 95 us a layer at 1024 cached tokens; fp32 equal)
        scores = torch.baddbmm(torch.bmm(k_pe, qr.transpose(1, 2)), kv, ql.transpose(1, 2))  # (B, S, T·H)
        scores = scores.transpose(1, 2) * self.scale  # (B, T·H, S)
        probs = self._softmax(scores, q_nope.dtype)
        o_lat = torch.bmm(probs, kv).view(bsz, t, heads, c)  # (B, T, H, c)
        return self._expand_values(o_lat)  # (B, T, H, v)

    def _sparse_naive_step(self, q_nope, q_pe, kv, k_pe, selected) -> torch.Tensor:
        """Naive MLA of a one-token step over its selected keys: only their K gathered latents are
        expanded. Returns (B, 1, H, v)."""
        idx = selected[:, 0]  # (B, K)
        kv_sel, pe_sel = _gather_rows(kv, idx[:, None])[:, 0], _gather_rows(k_pe, idx[:, None])[:, 0]  # (B, K, ·)
        hide = torch.zeros(idx.shape, dtype=q_nope.dtype, device=kv.device).masked_fill_(idx < 0, float("-inf"))
        return self._naive(q_nope, q_pe, kv_sel, pe_sel, hide[:, None, None, :] if bool((idx < 0).any()) else None)

    def pair_flops(self) -> tuple[int, int]:
        """Multiply-adds per (query, key) pair and head of a multi-token chunk: (masked naive, gathered
        absorbed) = (2·(nope + rope): the fused kernel pads v to nope + rope, 2·kv_lora_rank + rope)."""
        return 2 * (self.nope + self.rope), 2 * self.kv_lora_rank + self.rope

    def _gather_split(self, t: int, s: int, k: int) -> int:
        """The first query (of a chunk of t queries over s keys, the chunk's own last) that gathers its
        k selected latents rather than masking every other key: 0 in "absorb" mode, t in "naive"
        mode; in "auto" the first whose visible keys cost more masked than its k gathered keys
        (`pair_flops`, the gathered ones weighted by GATHER_PENALTY)."""
        if self.mode != "auto":
            return 0 if self.mode == "absorb" else t
        masked, gathered = self.pair_flops()
        keys_at = int(k * gathered * GATHER_PENALTY // masked)  # a query seeing more keys than this gathers
        return min(t, max(0, keys_at - (s - t)))  # query i sees s - t + i + 1 keys

    def _sparse_chunk(self, q_nope, q_pe, kv, k_pe, mask, selected) -> torch.Tensor:
        """MLA of a multi-token chunk over the keys each query selected, split at one query
        (`_gather_split`): the queries before it run naive attention under a mask that hides the
        keys they did not select (SPARSE_PREFILL_CHUNK at a time, over the keys up to each block's
        last query; a block that sees at most index_topk keys needs no selection mask), the rest
        gather their selected latents (absorbed). Both are exact; the split only moves work.

        Args:
            q_nope (B, T, H, nope), q_pe (B, T, H, rope), kv (B, S, c), k_pe (B, S, rope);
            mask: additive (T, S) or (B, 1, T, S), or None (every key visible);
            selected: (B, T, K) key positions, -1 = none.

        Returns:
            (B, T, H, v).
        """
        t, s = q_nope.shape[1], kv.shape[1]
        split = self._gather_split(t, s, selected.shape[-1])
        end = s - t + split  # keys the masked queries can see
        parts = []
        if split > 0:
            m = kv.new_zeros(1, 1, 1, end).expand(1, 1, split, end) if mask is None else mask[..., :split, :end]
            parts.append(self._naive(q_nope[:, :split], q_pe[:, :split], kv[:, :end], k_pe[:, :end], m,
                                     SPARSE_PREFILL_CHUNK, selected[:, :split]))  # (B, split, H, v)
        if split < t:
            parts.append(self._sparse_absorbed(q_nope[:, split:], q_pe[:, split:], kv, k_pe,
                                               selected[:, split:]))  # (B, T - split, H, v)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # (B, T, H, v)

    def _sparse_absorbed(self, q_nope, q_pe, kv, k_pe, selected) -> torch.Tensor:
        """Absorbed MLA over the selected keys only: each query gathers its K latents (work ∝ K, not
        the context). One-token steps on the Triton backend run the sparse decode kernel.

        Args:
            q_nope (B, T, H, nope), q_pe (B, T, H, rope), kv (B, S, c), k_pe (B, S, rope);
            selected: (B, T, K) key positions, -1 = none.

        Returns:
            (B, T, H, v).
        """
        q_lat = self._absorb_queries(q_nope)  # (B, T, H, c)
        bsz, t, heads, c = q_lat.shape
        if t == 1 and ops.resolve_backend(self.backend, kv.device) == "triton":
            o_lat = ops.sparse_mla_decode(q_lat[:, 0], q_pe[:, 0], kv, k_pe, selected[:, 0], self.scale,
                                          backend="triton")  # (B, H, c)
            return self._expand_values(o_lat.to(q_lat.dtype).unsqueeze(1))  # (B, 1, H, v)
        k = selected.shape[-1]
        step = max(1, min(t, GATHER_BYTES // max(bsz * k * (c + self.rope) * kv.element_size(), 1)))  # queries
        buf_c, buf_r = kv.new_empty(bsz * step * k * c), k_pe.new_empty(bsz * step * k * self.rope)  # reused
        o_lat = q_lat.new_empty(bsz, t, heads, c)  # (B, T, H, c)
        for lo in range(0, t, step):
            idx = selected[:, lo:lo + step]  # (B, t', K)
            n = idx.shape[0] * idx.shape[1]  # B·t' queries, each with its own K keys: one bmm batch entry each
            c_sel = _gather_rows(kv, idx, buf_c).view(n, k, c)  # (B·t', K, c)
            r_sel = _gather_rows(k_pe, idx, buf_r).view(n, k, self.rope)  # (B·t', K, rope)
            ql = q_lat[:, lo:lo + step].reshape(n, heads, c)  # (B·t', H, c)
            qr = q_pe[:, lo:lo + step].reshape(n, heads, self.rope)  # (B·t', H, rope)
            scores = torch.baddbmm(torch.bmm(qr, r_sel.transpose(1, 2)), ql, c_sel.transpose(1, 2))  # (B·t', H, K)
            scores.mul_(self.scale)
            if bool((idx < 0).any()):  # fewer visible keys than K
                scores.masked_fill_((idx < 0).reshape(n, 1, k), float("-inf"))
            probs = self._softmax(scores, q_lat.dtype)  # (B·t', H, K)
            o_lat[:, lo:lo + step] = torch.bmm(probs, c_sel).view(*idx.shape[:2], heads, c)  # (B, t', H, c)
        return self._expand_values(o_lat)  # (B, T, H, v)


def _per_head_narrow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each head's x·W_hᵀ computed as W_h·xᵀ in float32: x (B, T, H, K), w (H, N, K) float32 →
    (B, T, H, N) in x's dtype."""
    bsz, t, heads, k = x.shape
    rows = x.reshape(bsz * t, heads, k).permute(1, 2, 0).float()  # (H, K, B·T)
    out = torch.bmm(w, rows)  # (H, N, B·T)
    return out.permute(2, 0, 1).reshape(bsz, t, heads, w.shape[1]).to(x.dtype)  # (B, T, H, N)


def _heads_first_padded(v: torch.Tensor, width: int) -> torch.Tensor:
    """Per-head values (B, S, H, dv) as a contiguous heads-first (B, H, S, max(width, dv)) copy,
    zero-padded to the key width `width` (the CPU fused kernel needs equal q/k/v head dims)."""
    wide = max(width, v.shape[-1])
    return F.pad(v.transpose(1, 2), (0, wide - v.shape[-1])).contiguous()  # (B, H, S, wide)


def _gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v as two GEMMs, the scores and softmax in fp32: q (B, H, T, D),
    k (B, H, S, D), v (B, H, S, Dv), mask additive (T, S) or (B, 1, T, S) → (B, H, T, Dv) in q's
    dtype. v keeps its own width (fused attention on the CPU pads it to D)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float()  # (B, H, T, S)
    scores = scores.mul_(scale).add_(mask.float())
    probs = scores.softmax(dim=-1).to(q.dtype)  # (B, H, T, S)
    return torch.matmul(probs, v)  # (B, H, T, Dv)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x (B, S, W) at positions idx (B, T, K) (-1 reads row 0; callers mask it): (B, T, K, W),
    written into the front of the flat buffer `buf` when given (a reused buffer: the first touch of
    fresh pages costs several times the copy itself), or gathered afresh where autograd records x."""
    bsz, t, k = idx.shape
    w = x.shape[-1]
    flat = idx.clamp_min(0).reshape(bsz, t * k)  # (B, T*K)
    if torch.is_grad_enabled() and x.requires_grad:  # out= copies are not differentiable
        return torch.stack([x[b].index_select(0, flat[b]) for b in range(bsz)]).view(bsz, t, k, w)  # (B, T, K, W)
    out = (x.new_empty(bsz * t * k * w) if buf is None else buf[:bsz * t * k * w]).view(bsz, t * k, w)  # (B, T*K, W)
    for b in range(bsz):
        torch.index_select(x[b], 0, flat[b], out=out[b])  # whole-row copies
    return out.view(bsz, t, k, w)  # (B, T, K, W)


def _selection_mask(selected: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive (B, 1, T, S) mask that hides every key a query did not select (a selection
    holds visible keys only, so it also hides what the causal / padding mask hides)."""
    bsz, t, _ = selected.shape
    hide = torch.full((bsz, t, s + 1), float("-inf"), dtype=dtype, device=selected.device)  # column S takes the -1s
    hide.scatter_(-1, torch.where(selected < 0, s, selected), 0.0)
    return hide[:, None, :, :s]  # (B, 1, T, S)
