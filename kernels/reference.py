"""Pure-torch twins of every FP8 kernel: the CPU path and the test oracle.

Layouts follow the published DeepSeek-V3 checkpoint and its FP8 numerics:
  * weights: float8_e4m3fn [N, K] with fp32 `scale_inv` [ceil(N/128), ceil(K/128)] — the
    DEQUANTIZATION multiplier, w ≈ fp8 × scale_inv per 128×128 block; ragged edge blocks are
    zero-padded to 128 before their amax is taken;
  * activations: float8_e4m3fn [..., K] with fp32 scales [..., ceil(K/128)], one per token per
    128 channels, s = max(amax, 1e-4) / 448.
"""

from __future__ import annotations

import torch

from deepseek_model.constants import FP8_BLOCK as BLOCK
from deepseek_model.constants import FP8_DTYPE, FP8_MAX, SCALE_FMTS, ceil_div

ACT_AMAX_FLOOR = 1e-4  # keeps the scale of an all-zero activation group finite
SCALE_ROW_ALIGN = 4  # column-major activation scales: rows padded to 16 bytes (TMA alignment)


def check_block_size(block_size: int) -> None:
    """block_size must be a positive integer (the width of a scale group)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _check_fp8(t: torch.Tensor, name: str) -> None:
    if t.dtype != FP8_DTYPE:
        raise ValueError(f"{name}: expected float8_e4m3fn, got {t.dtype}")


def _check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def round_scale_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales up to a power of two (the UE8M0 scale format); zeros, inf and NaN stay."""
    # frexp gives s = m·2^e with m in [0.5, 1): s is an exact power of two iff m == 0.5.
    mant, exp = torch.frexp(s)
    exp = torch.where(mant == 0.5, exp - 1, exp)
    return torch.where((s > 0) & torch.isfinite(s), torch.ldexp(torch.ones_like(s), exp), s)  # inf and NaN stay


def act_quant(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None,
              column_major_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token per `block_size` channels to fp8 e4m3.

    Args:
        x: [..., K] float tensor (any float dtype; math in fp32). K need not divide block_size.
        block_size: channels sharing one scale.
        scale_fmt: None (fp32 scales) or "ue8m0" (scales rounded up to powers of two).
        column_major_scales: return the scales as a column-major [M, KB] view of a [KB, M_pad]
            buffer (M_pad a multiple of 4), the layout TMA-based GEMMs read; x must be 2-D.

    Returns:
        (y, s): y float8_e4m3fn [..., K]; s fp32 [..., ceil(K/block_size)] with x ≈ y · s.
    """
    _check_scale_fmt(scale_fmt)
    check_block_size(block_size)
    if x.dim() < 1 or not x.dtype.is_floating_point or x.dtype == FP8_DTYPE:
        raise ValueError(f"x: expected a float tensor with a last (channel) dimension, got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if column_major_scales and x.dim() != 2:
        raise ValueError(f"x: column_major_scales needs a 2-D x, got shape {tuple(x.shape)}")
    *lead, k = x.shape
    kb = ceil_div(k, block_size)
    xf = x.float()
    pad = kb * block_size - k
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    groups = xf.reshape(*lead, kb, block_size)  # (..., KB, BLOCK)
    amax = groups.abs().nan_to_num_(nan=0.0, posinf=float("inf")).amax(dim=-1)  # (..., KB): NaN left out
    amax = amax.clamp_min(ACT_AMAX_FLOOR)
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    y = (groups / s.unsqueeze(-1)).to(FP8_DTYPE)  # (..., KB, BLOCK)
    y = y.reshape(*lead, kb * block_size)[..., :k]
    if column_major_scales:
        m_pad = ceil_div(x.shape[0], SCALE_ROW_ALIGN) * SCALE_ROW_ALIGN
        s_cm = torch.empty(kb, m_pad, dtype=s.dtype, device=s.device)[:, : x.shape[0]].t()  # (M, KB)
        s = s_cm.copy_(s)
    return y.contiguous(), s


def _expand_block_scale(s: torch.Tensor, n: int, k: int, block_size: int) -> torch.Tensor:
    """[NB, KB] block scales → [n, k] elementwise scales (ragged tails cut off)."""
    return s.repeat_interleave(block_size, dim=0)[:n].repeat_interleave(block_size, dim=1)[:, :k]


def check_weight_scale(w: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK, name: str = "weight") -> None:
    """Raise ValueError unless `s` is the [ceil(N/b), ceil(K/b)] scale grid of the 2-D weight `w`."""
    if w.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
    grid = (ceil_div(w.shape[0], block_size), ceil_div(w.shape[1], block_size))
    if tuple(s.shape) != grid:
        raise ValueError(f"{name}: scale shape {tuple(s.shape)} does not match the {block_size}x{block_size} "
                         f"block grid {grid} of weight shape {tuple(w.shape)}")


# fp8 e4m3 → fp32 by bit placement (torch's own fp8 cast is a scalar loop, ~5x slower on CPU):
# the byte's sign goes to bit 31 and its 7 exponent+mantissa bits to bits 20..26, which reads as
# the e4m3 value times 2^-120 (normals land on fp32 normals, e4m3 subnormals on fp32 subnormals);
# the 2^120 is folded into the block scale, so each output is rounded once, exactly as
# fp8.float() * scale would be.
_E4M3_BIT_SHIFT = 20
_E4M3_SIGN_AND_MAGNITUDE = 0x87F00000 - (1 << 32)  # as a signed int32: bit 31 and bits 20..26
_E4M3_UNBIAS = 2.0 ** 120
_E4M3_NAN_RAW = 480.0 * 2.0 ** -120  # where the e4m3 NaN codes (S.1111.111) land after the shift
_E4M3_SCALE_LIMIT = 2.0 ** 7  # scale · 2^120 stays finite in fp32 below this


def _e4m3_raw(q: torch.Tensor) -> torch.Tensor:
    """fp32 [R, K] holding each e4m3 value of q times 2^-120 (NaN codes read as ±480·2^-120)."""
    bits = q.view(torch.int8).to(torch.int32)  # sign-extended byte
    bits.bitwise_left_shift_(_E4M3_BIT_SHIFT).bitwise_and_(_E4M3_SIGN_AND_MAGNITUDE)
    return bits.view(torch.float32)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, block_size: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a block-quantized weight: out[n, k] = w[n, k] · s[n // b, k // b].

    Args:
        w: [N, K] float8_e4m3fn weight.
        s: [ceil(N/b), ceil(K/b)] fp32 scale_inv (the multiplier).
        block_size: b.
        dtype: output dtype (explicit; the product is formed in fp32 then cast).

    Returns:
        [N, K] tensor of `dtype`. The product is formed in fp32 and rounded once, bit-identical to
        `w.float() * scale` (the e4m3 bytes are decoded by bit placement: torch's own fp8 cast is a
        scalar loop on CPU, ~5x slower).
    """
    check_block_size(block_size)
    _check_fp8(w, "w")
    check_weight_scale(w, s, block_size)
    rows, k = w.shape
    if w.numel() == 0:
        return torch.empty(rows, k, dtype=dtype, device=w.device)
    v = _e4m3_raw(w)  # (R, K) = fp8 · 2^-120
    lo, hi = torch.aminmax(v)
    if max(-lo.item(), hi.item()) >= _E4M3_NAN_RAW or not float(s.abs().max()) < _E4M3_SCALE_LIMIT:  # NaN too
        # NaN bytes present, or a scale so large that scale · 2^120 would overflow: torch's cast
        v = w.float()
        s_cols = s.float().repeat_interleave(block_size, dim=1)[:, :k]  # (ceil(R/b), K)
    else:
        s_cols = (s.float() * _E4M3_UNBIAS).repeat_interleave(block_size, dim=1)[:, :k]  # (ceil(R/b), K)
    full = rows // block_size * block_size
    if full:
        v[:full].view(full // block_size, block_size, k).mul_(s_cols[: full // block_size].unsqueeze(1))  # (R/b, b, K)
    if rows > full:
        v[full:].mul_(s_cols[-1])
    return v.to(dtype)


UE8M0_LOW_PEAK = FP8_MAX / 2  # 224: a block whose largest code rounds down to this is re-expressed at half the scale


def _canonical_ue8m0(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make ue8m0 blocks round-trip: a block's largest value / scale lies in (224, 448], but values
    in (224, 232) round to the code 224, and its bf16 dequantization then re-quantizes (by the same
    formula) at half the scale. Such a block is stored as (2·codes, scale / 2) instead: the same
    values exactly (doubling an e4m3 code is exact), and every block then peaks at a code >= 240,
    so fp8 → bf16 → fp8 gives back the same bytes.

    Args:
        q: (NB, b, KB, b) float8 codes; s: (NB, KB) power-of-two scales.
    """
    codes = q.float()  # (NB, b, KB, b)
    low = torch.maximum(codes.amax(dim=(1, 3)), codes.amin(dim=(1, 3)).neg()) == UE8M0_LOW_PEAK  # (NB, KB)
    if not bool(low.any()):
        return q, s
    doubled = torch.where(low[:, None, :, None], codes * 2, codes).to(FP8_DTYPE)  # (NB, b, KB, b)
    return doubled, torch.where(low, s / 2, s)


def weight_quant(w: torch.Tensor, block_size: int = BLOCK,
                 scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight per block_size×block_size block (the published checkpoint formula).

    scale_inv = amax(block) / 448 with ragged edge blocks zero-padded (so their amax is over the
    real elements); an all-zero block gets scale_inv 0 and fp8 zeros. ue8m0 rounds the scale up to
    a power of two, and a block whose codes peak at 224 is stored at half that scale with doubled
    codes (same values; see _canonical_ue8m0), so dequantizing an ue8m0 checkpoint this wrote and
    quantizing it again gives back its bytes.

    Args:
        w: [N, K] float tensor.
        block_size: b.
        scale_fmt: None or "ue8m0".

    Returns:
        (q, scale_inv): q float8_e4m3fn [N, K]; scale_inv fp32 [ceil(N/b), ceil(K/b)].
    """
    _check_scale_fmt(scale_fmt)
    check_block_size(block_size)
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    rows, k = w.shape
    rb, kb = ceil_div(rows, block_size), ceil_div(k, block_size)
    if rows == rb * block_size and k == kb * block_size:
        padded = w.to(torch.float32, copy=True)  # (N, K): our own fp32 copy (divided in place below)
    else:
        padded = torch.nn.functional.pad(w.float(), (0, kb * block_size - k, 0, rb * block_size - rows))  # (NB·b, KB·b)
    blocks = padded.view(rb, block_size, kb, block_size)  # (NB, b, KB, b)
    amax = torch.maximum(blocks.amax(dim=(1, 3)), blocks.amin(dim=(1, 3)).neg_())  # (NB, KB) without an abs copy
    s = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    divisor = torch.where(s > 0, s, 1.0)  # an all-zero block divides its zeros by 1
    blocks.div_(divisor[:, None, :, None])  # (NB, b, KB, b), in place
    if not bool(s.all()):
        blocks.masked_fill_((s == 0)[:, None, :, None], 0.0)  # all-zero blocks give +0, even from -0.0
    q = blocks.to(FP8_DTYPE)  # (NB, b, KB, b)
    if scale_fmt == "ue8m0":
        q, s = _canonical_ue8m0(q, s)
    return q.view(rb * block_size, kb * block_size)[:rows, :k].contiguous(), s  # (N, K), (NB, KB)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, w: torch.Tensor, w_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block_size: int = BLOCK) -> torch.Tensor:
    """C = A·Wᵀ with fp32 accumulation and the scales applied per block_size-wide K block.

    Args:
        a: [M, K] float8_e4m3fn activations.
        a_s: [M, ceil(K/b)] fp32 activation scales.
        w: [N, K] float8_e4m3fn weight.
        w_s: [ceil(N/b), ceil(K/b)] fp32 weight scale_inv.
        out_dtype: dtype of C.
        block_size: b.

    Returns:
        [M, N] tensor of out_dtype.
    """
    check_block_size(block_size)
    _check_fp8(a, "a")
    _check_fp8(w, "w")
    if not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype: expected a float dtype, got {out_dtype}")
    m, k = a.shape
    n = w.shape[0]
    check_weight_scale(w, w_s, block_size)
    kb = ceil_div(k, block_size)
    if w.shape[1] != k or tuple(a_s.shape) != (m, kb):
        raise ValueError(f"fp8_gemm: a {tuple(a.shape)}, a_s {tuple(a_s.shape)} do not fit w {tuple(w.shape)}")
    w_s_rows = w_s.float().repeat_interleave(block_size, dim=0)[:n]  # (N, KB)
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for j in range(kb):
        sl = slice(j * block_size, min(k, (j + 1) * block_size))
        part = a[:, sl].float() @ w[:, sl].float().T  # (M, N)
        acc += part * a_s[:, j:j + 1].float() * w_s_rows[:, j].unsqueeze(0)
    return acc.to(out_dtype)



def check_moe_inputs(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor,
                     block_size: int = BLOCK) -> None:
    """Raise ValueError naming the argument unless the routed-expert inputs fit together."""
    check_block_size(block_size)
    if x.dim() != 2 or not x.dtype.is_floating_point or x.dtype == FP8_DTYPE:
        raise ValueError(f"x: expected float [T, H] activations, got {x.dtype} of shape {tuple(x.shape)}")
    for name, sc in (("w13_s", w13_s), ("w2_s", w2_s)):
        if sc.dtype != torch.float32:
            raise ValueError(f"{name}: expected float32 block scales, got {sc.dtype}")
    t, h = x.shape
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids: expected int [T={t}, topk], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"topk_weights: expected shape {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}")
    for name, w in (("w13", w13), ("w2", w2)):
        if w.dtype != FP8_DTYPE or w.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D {FP8_DTYPE} tensor, got {w.dtype} {tuple(w.shape)}")
    e, two_i, hw = w13.shape
    if hw != h or two_i % 2:
        raise ValueError(f"w13: expected [E, 2I, H={h}], got {tuple(w13.shape)}")
    if tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"w2: expected [E, H, I] = {(e, h, two_i // 2)}, got {tuple(w2.shape)}")
    for name, w, s in (("w13_s", w13, w13_s), ("w2_s", w2, w2_s)):
        grid = (e, ceil_div(w.shape[1], block_size), ceil_div(w.shape[2], block_size))
        if tuple(s.shape) != grid:
            raise ValueError(f"{name}: expected block-scale shape {grid}, got {tuple(s.shape)}")
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= e):
        raise ValueError(f"topk_ids: expert ids must lie in [0, {e})")


def fused_moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13: torch.Tensor, w13_s: torch.Tensor, w2: torch.Tensor, w2_s: torch.Tensor,
              block_size: int = BLOCK, scale_fmt: str | None = None) -> torch.Tensor:
    """Routed experts, W8A8, one expert at a time (the twin of the fused Triton MoE).

    For each expert e and its routed tokens: a = act_quant(x); [g | u] = a·w13[e]ᵀ (fp32);
    h = silu(g)·u; y = act_quant(h)·w2[e]ᵀ (fp32); out[token] += topk_weight · y.

    Args:
        x: [T, H] activations.
        topk_weights: [T, topk] routing weights (already normalised and scaled).
        topk_ids: [T, topk] int expert ids.
        w13: [E, 2I, H] float8_e4m3fn, gate rows then up rows; w13_s [E, ceil(2I/b), ceil(H/b)] fp32.
        w2: [E, H, I] float8_e4m3fn down projection; w2_s [E, ceil(H/b), ceil(I/b)] fp32.
        block_size: b.
        scale_fmt: activation scale format (None or "ue8m0").

    Returns:
        [T, H] in x.dtype (accumulated in fp32).
    """
    check_moe_inputs(x, topk_weights, topk_ids, w13, w13_s, w2, w2_s, block_size)
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # (T, H)
    a, a_s = act_quant(x, block_size, scale_fmt)  # (T, H), (T, HB): per token, so once for all experts
    for e in range(w13.shape[0]):
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)  # (n_e,), (n_e,)
        if tok.numel() == 0:
            continue
        gu = fp8_gemm(a[tok], a_s[tok], w13[e], w13_s[e], torch.float32, block_size)  # (n_e, 2I)
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]  # (n_e, I)
        hq, hs = act_quant(h, block_size, scale_fmt)
        y = fp8_gemm(hq, hs, w2[e], w2_s[e], torch.float32, block_size)  # (n_e, H)
        out.index_add_(0, tok, y * topk_weights[tok, slot].float().unsqueeze(1))
    return out.to(x.dtype)


def _check_latent_operands(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor,
                           k_rope: torch.Tensor) -> None:
    """Raise ValueError naming the argument unless the shapes are [B,H,C], [B,H,R], [B,S,C], [B,S,R]."""
    if q_lat.dim() != 3 or q_rope.dim() != 3 or q_rope.shape[:2] != q_lat.shape[:2]:
        raise ValueError(f"q_lat/q_rope: expected [B, H, C] and [B, H, R], got {tuple(q_lat.shape)}, "
                         f"{tuple(q_rope.shape)}")
    b, _, c = q_lat.shape
    r = q_rope.shape[2]
    if kv.dim() != 3 or kv.shape[0] != b or kv.shape[2] != c:
        raise ValueError(f"kv: expected [B={b}, S, C={c}], got {tuple(kv.shape)}")
    if tuple(k_rope.shape) != (b, kv.shape[1], r):
        raise ValueError(f"k_rope: expected {(b, kv.shape[1], r)}, got {tuple(k_rope.shape)}")


def check_mla_inputs(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                     cache_seqlens: torch.Tensor, cache_starts: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the argument unless the absorbed-MLA decode inputs fit together."""
    _check_latent_operands(q_lat, q_rope, kv, k_rope)
    b = q_lat.shape[0]
    if tuple(cache_seqlens.shape) != (b,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_seqlens: expected int [B={b}], got {cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    if b and (int(cache_seqlens.min()) < 1 or int(cache_seqlens.max()) > kv.shape[1]):
        raise ValueError(f"cache_seqlens: lengths must lie in [1, {kv.shape[1]}]")
    if cache_starts is not None:
        if tuple(cache_starts.shape) != (b,) or cache_starts.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cache_starts: expected int [B={b}], got {cache_starts.dtype} {tuple(cache_starts.shape)}")
        if b and (int(cache_starts.min()) < 0 or bool((cache_starts.to(cache_seqlens.device) >= cache_seqlens).any())):
            raise ValueError("cache_starts: every row needs 0 <= start < its length (at least one key)")


def mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
               cache_seqlens: torch.Tensor, scale: float, cache_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed MLA decode (one query token per sequence) over the latent cache, plain attention.

    scores = (q_lat·cᵀ + q_rope·k_ropeᵀ)·scale over positions [cache_starts[b], cache_seqlens[b])
    (a ragged, left-padded batch: each row's own keys), softmax in fp32, o_lat = p·c. The latent c
    is both key (with k_rope) and value.

    Args:
        q_lat: [B, H, C] absorbed query (q_nope·W_UK), C = kv_lora_rank.
        q_rope: [B, H, R] rotated rope query.
        kv: [B, S, C] normalised latent cache (may be a view of a [B, S, C+R] cache).
        k_rope: [B, S, R] rotated shared rope key.
        cache_seqlens: [B] int valid lengths (>= 1).
        scale: softmax scale.
        cache_starts: optional [B] int first valid position of each row (default 0).

    Returns:
        o_lat [B, H, C] fp32.
    """
    check_mla_inputs(q_lat, q_rope, kv, k_rope, cache_seqlens, cache_starts)
    s_max = kv.shape[1]
    scores = (torch.einsum("bhc,bsc->bhs", q_lat.float(), kv.float())
              + torch.einsum("bhr,bsr->bhs", q_rope.float(), k_rope.float())) * scale  # (B, H, S)
    slots = torch.arange(s_max, device=kv.device)[None, :]  # (1, S)
    valid = slots < cache_seqlens[:, None].to(kv.device)  # (B, S)
    if cache_starts is not None:
        valid &= slots >= cache_starts[:, None].to(kv.device)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, H, S) fp32
    return torch.einsum("bhs,bsc->bhc", p, kv.float())  # (B, H, C)


# DeepSeek-V3.2 sparse attention (DSA): the lightning indexer's logits and MLA over selected keys.
INDEX_DTYPES = (FP8_DTYPE, torch.float32, torch.bfloat16, torch.float16)
# fp32 per-head scores the index_logits twin holds at once (4 MiB, in cache): query tokens go in
# chunks through one reused buffer. One thread, 256 queries x 8 heads x 64 against 4096 keys: 34 ms
# with a fresh 32 MiB tensor per call (its first touch costs more than the GEMM), 14 ms so.
INDEX_TWIN_ELEMS = 1 << 20


def check_index_inputs(q: torch.Tensor, q_scale: torch.Tensor | None, k: torch.Tensor,
                       k_scale: torch.Tensor | None, weights: torch.Tensor) -> None:
    """Raise ValueError naming the argument unless the indexer-logit inputs fit together."""
    if q.dim() != 4 or q.dtype not in INDEX_DTYPES:
        raise ValueError(f"q: expected [B, T, H, D] of one of {INDEX_DTYPES}, got {q.dtype} {tuple(q.shape)}")
    b, t, h, d = q.shape
    if k.dim() != 3 or k.shape[0] != b or k.shape[2] != d or k.dtype not in INDEX_DTYPES:
        raise ValueError(f"k: expected [B={b}, S, D={d}] of one of {INDEX_DTYPES}, got {k.dtype} {tuple(k.shape)}")
    for name, scale, x, shape in (("q_scale", q_scale, q, (b, t, h)), ("k_scale", k_scale, k, (b, k.shape[1]))):
        if scale is None:
            if x.dtype == FP8_DTYPE:
                raise ValueError(f"{name}: required with a {FP8_DTYPE} operand")
        elif scale.dtype != torch.float32 or tuple(scale.shape) != shape:
            raise ValueError(f"{name}: expected float32 {shape}, got {scale.dtype} {tuple(scale.shape)}")
    if weights.dtype != torch.float32 or tuple(weights.shape) != (b, t, h):
        raise ValueError(f"weights: expected float32 {(b, t, h)}, got {weights.dtype} {tuple(weights.shape)}")


def index_logits(q: torch.Tensor, q_scale: torch.Tensor | None, k: torch.Tensor, k_scale: torch.Tensor | None,
                 weights: torch.Tensor) -> torch.Tensor:
    """Lightning-indexer logits: Σ_h weights · ReLU(q_h·k), every query token against every key.

    logits[b, t, s] = Σ_h weights[b, t, h] · ReLU((q[b, t, h]·q_scale[b, t, h]) · (k[b, s]·k_scale[b, s])),
    the D-long dot in fp32. No mask is applied (the caller adds its causal / padding mask).
    Operation order (the Triton kernel's): fp8 is upcast exactly; dot = q·k on the raw values;
    logits = (Σ_h ReLU(dot) · (weights · q_scale)) · k_scale. The scales must be positive (as
    act_quant's are), so they commute with the ReLU.

    Args:
        q: [B, T, H, D] float8_e4m3fn or float index queries.
        q_scale: [B, T, H] fp32 dequantization scale per (token, head); None for a float q (scale 1).
        k: [B, S, D] float8_e4m3fn or float index keys.
        k_scale: [B, S] fp32 dequantization scale per key; None for a float k (scale 1).
        weights: [B, T, H] fp32 per-head weights (any constant factors already folded in).

    Returns:
        logits [B, T, S] fp32.
    """
    check_index_inputs(q, q_scale, k, k_scale, weights)
    b, t, h, d = q.shape
    s = k.shape[1]
    head_w = weights if q_scale is None else weights * q_scale  # (B, T, H)
    kf = k.float()  # (B, S, D): exact for fp8
    rows = max(1, min(t, INDEX_TWIN_ELEMS // max(1, h * s)))  # query tokens per chunk
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in (q, q_scale, k, k_scale, weights)):  # out= has no backward
        out = torch.cat([torch.einsum("bths,bth->bts",
                                      torch.einsum("bthd,bsd->bths", q[:, t0:t0 + rows].float(), kf).relu(),
                                      head_w[:, t0:t0 + rows])
                         for t0 in range(0, t, rows)] or [kf.new_empty(b, 0, s)], 1)  # (B, T, S)
        return out if k_scale is None else out * k_scale[:, None, :]
    out = torch.empty(b, t, s, dtype=torch.float32, device=q.device)  # (B, T, S)
    buf = torch.empty(rows * h * s, dtype=torch.float32, device=q.device)  # reused per-head scores
    for i in range(b):
        for t0 in range(0, t, rows):
            r = min(rows, t - t0)
            scores = buf[: r * h * s].view(r * h, s)  # (t'·H, S)
            torch.mm(q[i, t0:t0 + r].reshape(r * h, d).float(), kf[i].T, out=scores).relu_()  # (t'·H, S)
            torch.bmm(head_w[i, t0:t0 + r, None, :], scores.view(r, h, s),
                      out=out[i, t0:t0 + r, None, :])  # (t', 1, H) @ (t', H, S) → (t', 1, S)
    if k_scale is not None:
        out.mul_(k_scale[:, None, :])  # (B, T, S) · (B, 1, S)
    return out


def check_sparse_mla_inputs(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                            indices: torch.Tensor) -> None:
    """Raise ValueError naming the argument unless the sparse-MLA decode inputs fit together."""
    _check_latent_operands(q_lat, q_rope, kv, k_rope)
    b, s = q_lat.shape[0], kv.shape[1]
    if (indices.dim() != 2 or indices.shape[0] != b or indices.shape[1] < 1
            or indices.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"indices: expected int [B={b}, K>=1], got {indices.dtype} {tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= s):
        raise ValueError(f"indices: entries must lie in [-1, {s}) (-1 = no key)")
    if indices.numel() and not bool((indices >= 0).any(dim=1).all()):
        raise ValueError("indices: every row needs at least one valid (>= 0) index")


def sparse_mla_decode(q_lat: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                      indices: torch.Tensor, scale: float) -> torch.Tensor:
    """Absorbed MLA decode over a selected subset of each row's latent cache (DSA), plain attention.

    scores[b, h, j] = (q_lat[b, h]·kv[b, i] + q_rope[b, h]·k_rope[b, i])·scale for i = indices[b, j]
    (entries -1 skipped), softmax over j in fp32, o_lat[b, h] = Σ_j p·kv[b, i]. A duplicated index
    is a second key with the same content (counted once per occurrence).

    Args:
        q_lat: [B, H, C] absorbed query (q_nope·W_UK), C = kv_lora_rank.
        q_rope: [B, H, R] rotated rope query.
        kv: [B, S, C] latent cache, also the values (may be a view of a [B, S, C+R] cache).
        k_rope: [B, S, R] rotated shared rope key.
        indices: [B, K] int32/int64 positions in [0, S), or -1 for "no key"; each row has one valid entry.
        scale: softmax scale.

    Returns:
        o_lat [B, H, C] fp32.
    """
    check_sparse_mla_inputs(q_lat, q_rope, kv, k_rope, indices)
    idx = indices.to(device=kv.device, dtype=torch.int64)  # (B, K)
    valid = idx >= 0  # (B, K)
    rows = idx.clamp_min(0)[..., None]  # (B, K, 1)
    c = torch.gather(kv, 1, rows.expand(-1, -1, kv.shape[2])).float()  # (B, K, C)
    kr = torch.gather(k_rope, 1, rows.expand(-1, -1, k_rope.shape[2])).float()  # (B, K, R)
    scores = (torch.einsum("bhc,bkc->bhk", q_lat.float(), c)
              + torch.einsum("bhr,bkr->bhk", q_rope.float(), kr)) * scale  # (B, H, K)
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)  # (B, H, K) fp32
    return torch.einsum("bhk,bkc->bhc", p, c)  # (B, H, C)


def stack_experts(gate: list[tuple[torch.Tensor, torch.Tensor]], up: list[tuple[torch.Tensor, torch.Tensor]],
                  down: list[tuple[torch.Tensor, torch.Tensor]],
                  block_size: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-expert checkpoint weights into the fused-MoE layout.

    Args:
        gate, up: per expert (fp8 [I, H] weight, fp32 [⌈I/b⌉, ⌈H/b⌉] scale_inv).
        down: per expert (fp8 [H, I] weight, fp32 [⌈H/b⌉, ⌈I/b⌉] scale_inv).
        block_size: b; I must be a multiple of b so gate and up scale blocks stay aligned in w13.

    Returns:
        (w13 [E, 2I, H], w13_s [E, 2I/b, ⌈H/b⌉], w2 [E, H, I], w2_s [E, ⌈H/b⌉, I/b]).
    """
    if not (len(gate) == len(up) == len(down)) or not gate:
        raise ValueError(f"gate/up/down: expected the same non-zero number of experts, got "
                         f"{len(gate)}, {len(up)}, {len(down)}")
    inter = gate[0][0].shape[0]
    if inter % block_size:
        raise ValueError(f"gate: intermediate size {inter} is not a multiple of block_size {block_size}; "
                         "gate and up blocks would not align in w13")
    w13 = torch.stack([torch.cat([g[0], u[0]], dim=0) for g, u in zip(gate, up)])  # (E, 2I, H)
    w13_s = torch.stack([torch.cat([g[1], u[1]], dim=0) for g, u in zip(gate, up)])  # (E, 2I/b, HB)
    w2 = torch.stack([d[0] for d in down])  # (E, H, I)
    w2_s = torch.stack([d[1] for d in down])  # (E, HB, I/b)
    return w13, w13_s, w2, w2_s
