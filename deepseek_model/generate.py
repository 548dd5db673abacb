"""Generation: sampling, the batched prefill/decode loop over the latent cache, MTP speculative decoding.

Prompts of different lengths share one batch: they are left-padded, every row gets its own RoPE
positions (its padding does not shift them) and a key-validity mask hides the padding, so each row
produces what it would alone. Finished rows (EOS) leave the batch and its cache.

MTP speculative decoding (depth 1, one sequence at a time): the MTP module drafts the token after
next; the main model verifies [current, draft] in one forward; on rejection the cache rolls back by
overwriting the draft's slot. Greedy output equals plain greedy decoding; with sampling, the draft
is accepted with probability min(1, p/q) and a rejection resamples from max(p - q, 0), which keeps
the main model's distribution.
"""

from __future__ import annotations

import math
import numbers
import operator
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from deepseek_model import memory
from deepseek_model.model import Cache, Transformer

SPECULATIVE_MODES = (None, "mtp")
DEFAULT_SEED = 0
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
SPEC_TOKENS = 2  # a verify forward holds the current token and one MTP draft


class NonFiniteLogits(ValueError):
    """Generation met NaN or +inf logits; the message says which row."""


@dataclass
class GenerationStats:
    """Counters of one generate() call."""

    new_tokens: int = 0  # tokens generated over all sequences
    # forwards of the main model (prefill included), summed over sequences for speculative decoding (which
    # runs one sequence at a time) and counted once per batched step otherwise
    main_forwards: int = 0
    token_forwards: int = 0  # sum over sequences of the main forwards each took part in
    drafted: int = 0  # MTP draft tokens proposed to the verifier
    accepted: int = 0  # drafts the verifier accepted
    prefill_seconds: float = 0.0  # wall time of the prefill forwards
    decode_seconds: float = 0.0  # wall time of everything after the prefill
    peak_cache_bytes: int = 0  # largest latent-cache size reached

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """New tokens per main-model forward a sequence took part in (1.0 for plain decoding)."""
        return self.new_tokens / self.token_forwards if self.token_forwards else 0.0



@dataclass
class GenerationResult:
    """What generate() returns.

    Attributes:
        tokens: per prompt, the new token ids (the EOS token included when one was produced).
        finish_reasons: per prompt, "eos" or "length".
        stats: counters (acceptance rate, tokens per forward, timings, cache size).
    """

    tokens: list[list[int]]
    finish_reasons: list[str]
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass(frozen=True)
class Sampling:
    """Decoding parameters: temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        """Whether decoding is argmax."""
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Filtered sampling distribution (N, V) fp32 from logits (N, V)."""
        x = logits.float() / self.temperature  # (N, V)
        if not bool(torch.isfinite(x.amax(-1)).all()):  # a tiny temperature overflowed: scale the gaps to the max
            gaps = (logits.double() - logits.double().amax(-1, keepdim=True)) / self.temperature  # (N, V) <= 0, fp64
            x = gaps.float()  # 0 at the max, -inf where the gap overflowed
        if self.top_k and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]  # (N, 1)
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_x, order = x.sort(dim=-1, descending=True)  # (N, V)
            cum = sorted_x.softmax(-1).cumsum(-1)
            drop = cum - sorted_x.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
        return x.softmax(-1)

    def pick(self, logits: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """One token per row (N,) from logits (N, V); row i samples with gens[i].

        Raises:
            NonFiniteLogits: a row holds NaN or +inf (broken weights or an overflow): no token is
                made up from it.
        """
        bad = ~torch.isfinite(logits) & ~torch.isneginf(logits)  # -inf is a masked token, not an error
        if bool(bad.any()):
            row = int(bad.any(-1).nonzero()[0, 0])
            raise NonFiniteLogits(f"the model produced non-finite logits (NaN or +inf) for row {row}: "
                                  "the weights or the activations are broken; no token was sampled")
        if self.greedy:
            return logits.argmax(-1)
        p = self.probs(logits)
        return torch.stack([torch.multinomial(p[i], 1, generator=gens[i])[0] for i in range(p.shape[0])])


def _integer(value, name: str) -> int:
    """An integer argument (a Python or numpy integer, not a bool or a float), else a ValueError naming it."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _number(value, name: str) -> float:
    """A real-number argument, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, speculative) -> Sampling:
    if _integer(max_new_tokens, "max_new_tokens") < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not math.isfinite(_number(temperature, "temperature")) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0.0 < _number(top_p, "top_p") <= 1.0:  # also refuses NaN
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if _integer(top_k, "top_k") < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if speculative not in SPECULATIVE_MODES:
        raise ValueError(f"speculative must be one of {SPECULATIVE_MODES}, got {speculative!r}")
    return Sampling(float(temperature), float(top_p), operator.index(top_k))


def normalize_prompts(prompts, vocab_size: int) -> list[list[int]]:
    """Token-id prompts as lists: accepts a (B, T) or (T,) tensor, a list of ints, or a list of
    lists / 1-D tensors. Raises a one-line ValueError for empty prompts or ids outside the vocab."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2):
            raise ValueError(f"prompts must be a (T,) or (B, T) tensor, got shape {tuple(prompts.shape)}")
        rows = [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, numbers.Integral) for t in prompts):
        rows = [list(prompts)]
    elif isinstance(prompts, (list, tuple)) and prompts:
        rows = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    else:
        raise ValueError("prompts must be token ids: a non-empty list of ints, a list of lists, or a tensor")
    out = []
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompts: prompt {i} is empty")
        ids = []
        for t in row:
            try:
                ids.append(_integer(t, "a token id"))
            except ValueError:
                raise ValueError(f"prompts: token id {t!r} in prompt {i} is not an integer") from None
        bad = [t for t in ids if t < 0 or t >= vocab_size]
        if bad:
            raise ValueError(f"prompts: token id {bad[0]} in prompt {i} is outside [0, vocab_size={vocab_size})")
        out.append(ids)
    return out


def _eos_set(model: Transformer, eos) -> set[int]:
    if eos is None:
        eos = model.cfg.eos_token_id
    if eos is None:
        return set()
    if isinstance(eos, numbers.Integral) and not isinstance(eos, bool):
        return {int(eos)}
    if not isinstance(eos, (list, tuple, set, frozenset)):
        raise ValueError(f"eos must be a token id, a list of them, [] or None, got {eos!r}")
    return {_integer(e, "eos") for e in eos}


def _finish(tokens: list[int], eos: set[int], max_new: int) -> tuple[list[int], bool]:
    """Cut tokens after the first EOS (kept) or at max_new; returns (tokens, hit_eos)."""
    for i, t in enumerate(tokens[:max_new]):
        if t in eos:
            return tokens[: i + 1], True
    return tokens[:max_new], False


def encode_prompts(prompts, tokenizer=None, chat: bool = False, max_tokens: int | None = None):
    """Text prompts → token ids with `tokenizer` (chat: through its chat template, one user turn);
    token-id prompts pass through unchanged. With `max_tokens`, a text too long to fit in that many
    tokens (more UTF-8 bytes than max_tokens tokens can spell) is refused before it is tokenized."""
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, (list, tuple)) or not texts or not any(isinstance(p, str) for p in texts):
        return prompts
    if tokenizer is None:
        raise ValueError("prompts: text prompts need a tokenizer (tokenizer=load_tokenizer(checkpoint_dir))")
    if not all(isinstance(p, str) for p in texts):
        raise ValueError("prompts: mix of text and token ids; pass one kind")
    if max_tokens is not None:
        limit = max_tokens * tokenizer.max_token_bytes
        for i, text in enumerate(texts):
            if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
                raise ValueError(f"prompts: prompt {i} has {len(text.encode('utf-8', 'surrogatepass'))} bytes of text, "
                                 f"more than {max_tokens} tokens of at most {tokenizer.max_token_bytes} bytes each "
                                 f"can hold (max_seq_len {max_tokens})")
    if chat:
        return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in texts]
    return [tokenizer.encode(p) for p in texts]


def generate(model: Transformer, prompts, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, eos: int | Sequence[int] | None = None, speculative: str | None = None,
             seed: int = DEFAULT_SEED, cache_fp8: bool = False, step_fn=None, tokenizer=None,
             chat: bool = False, batch_invariant: bool | None = None) -> GenerationResult:
    """Generate continuations of token-id prompts with the latent cache.

    Args:
        model: a loaded Transformer (eval mode).
        prompts: token ids: a list of ints (one prompt), a list of lists / 1-D tensors (prompts of
            any lengths), or a (B, T) tensor; or text (a string or a list of strings) with `tokenizer`.
        max_new_tokens: tokens to generate per prompt (fewer when EOS comes first).
        temperature: 0 for greedy, else the softmax temperature of sampling.
        top_p: nucleus sampling mass (1 disables).
        top_k: keep the k most likely tokens (0 disables).
        eos: stop token id(s); None uses the config's eos_token_id, [] disables stopping.
        speculative: None, or "mtp" for MTP speculative decoding (needs a model with MTP).
        seed: sampling seed; prompt i samples from its own generator seeded seed + i, so a prompt
            samples the same tokens alone or in a batch.
        cache_fp8: keep the latent cache in float8 with a per-token scale.
        step_fn: optional replacement for `model` in plain decode steps (e.g. torch.compile(model));
            called as step_fn(ids, start_pos, cache, positions=..., valid=...).
        tokenizer: a deepseek_model.tokenizer.Tokenizer, needed for text prompts.
        chat: wrap each text prompt as one user turn of the tokenizer's chat template.
        batch_invariant: require a model loaded with `batch_invariant=True` (its rows' logits, and
            so greedy MTP speculative output, do not depend on batching, chunking or drafts).

    Returns:
        GenerationResult with the new tokens per prompt, finish reasons and stats.

    Raises:
        ValueError: bad arguments, ids outside the vocabulary, or a prompt plus max_new_tokens
            longer than the model's max_seq_len.
    """
    if batch_invariant and not model.spec.batch_invariant:
        raise ValueError("batch_invariant: the model was loaded without it (from_pretrained(..., batch_invariant=True))")
    sampling = _check_sampling(temperature, top_p, top_k, max_new_tokens, speculative)
    for name, flag in (("cache_fp8", cache_fp8), ("chat", chat)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if step_fn is not None and not callable(step_fn):
        raise ValueError(f"step_fn must be callable like the model, got {step_fn!r}")
    rows = normalize_prompts(encode_prompts(prompts, tokenizer, chat, model.max_seq_len), model.cfg.vocab_size)
    longest = max(len(r) for r in rows)
    if longest > model.max_seq_len:
        raise ValueError(f"prompts: a prompt has {longest} tokens, longer than max_seq_len {model.max_seq_len}")
    if longest + max_new_tokens > model.max_seq_len:
        raise ValueError(f"max_new_tokens: {longest} prompt tokens + {max_new_tokens} new tokens exceed "
                         f"max_seq_len {model.max_seq_len}")
    rows_at_once = 1 if speculative == "mtp" else len(rows)  # speculation decodes one prompt at a time
    memory.require(memory.generation_bytes(model.cfg, rows_at_once, longest, longest + max_new_tokens,
                                           model.spec.dtype.itemsize, cache_fp8),
                   f"generating {max_new_tokens} tokens for {rows_at_once} prompt(s) of up to {longest} tokens "
                   f"(latent cache and prefill)")
    if speculative == "mtp" and not model.has_mtp:
        raise ValueError("speculative: 'mtp' needs an MTP module: the checkpoint has none, or it was loaded with mtp=False")
    seed = _integer(seed, "seed")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1] - (len(rows) - 1):
        raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - (len(rows) - 1)}] for {len(rows)} "
                         f"prompt(s) (prompt i samples with seed + i), got {seed}")
    device = model.inv_freq.device
    gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(len(rows))]
    eos_ids = _eos_set(model, eos)
    stats = GenerationStats()
    with torch.no_grad():
        if speculative == "mtp":
            outs = [_speculative_one(model, r, max_new_tokens, sampling, eos_ids, gens[i], cache_fp8, stats)
                    for i, r in enumerate(rows)]
        else:
            outs = _batched(model, rows, max_new_tokens, sampling, eos_ids, gens, cache_fp8, stats,
                            model if step_fn is None else step_fn)
    tokens, reasons = [], []
    for out in outs:
        cut, hit = _finish(out, eos_ids, max_new_tokens)
        tokens.append(cut)
        reasons.append("eos" if hit else "length")
    stats.new_tokens = sum(len(t) for t in tokens)
    return GenerationResult(tokens, reasons, stats)


def _batched(model: Transformer, rows: list[list[int]], max_new: int, sampling: Sampling, eos: set[int],
             gens: list[torch.Generator], cache_fp8: bool, stats: GenerationStats, step_fn) -> list[list[int]]:
    """Plain decoding of all prompts together (left-padded, per-row positions, finished rows dropped)."""
    device = model.inv_freq.device
    bsz, longest = len(rows), max(len(r) for r in rows)
    pad = torch.tensor([longest - len(r) for r in rows], device=device)  # (B,)
    ids = torch.tensor([[0] * (longest - len(r)) + r for r in rows], device=device)  # (B, L) left-padded
    slots = torch.arange(longest, device=device)  # (L,)
    ragged = bool(pad.any())
    positions = (slots - pad.unsqueeze(1)).clamp_min(0) if ragged else None  # (B, L)
    valid = slots >= pad.unsqueeze(1) if ragged else None  # (B, L)
    cache = model.new_cache(fp8=cache_fp8)
    t0 = time.perf_counter()
    logits = model.head(model.hidden(ids, 0, cache, positions=positions, valid=valid)[:, -1])  # (B, V) last only
    stats.prefill_seconds += time.perf_counter() - t0
    stats.main_forwards += 1
    stats.token_forwards += bsz
    t0 = time.perf_counter()
    outs: list[list[int]] = [[] for _ in rows]
    alive = list(range(bsz))  # original row of each batch row
    row_gens = list(gens)
    pos = longest
    while True:
        nxt = sampling.pick(logits, row_gens)  # (b,)
        keep = []
        for j, r in enumerate(alive):
            outs[r].append(int(nxt[j]))
            if len(outs[r]) < max_new and outs[r][-1] not in eos:
                keep.append(j)
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, cache.nbytes())
        if not keep:
            break
        if len(keep) < len(alive):  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep, device=device)
            cache.select(sel)
            nxt, pad = nxt[sel], pad[sel]
            valid = valid[sel] if valid is not None else None
            alive, row_gens = [alive[j] for j in keep], [row_gens[j] for j in keep]
        step_pos = (pos - pad).unsqueeze(1) if ragged else None  # (b, 1)
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(len(alive), 1)], dim=1)  # (b, pos + 1)
        logits = step_fn(nxt.unsqueeze(1), pos, cache, positions=step_pos, valid=valid)[:, -1]  # (b, V)
        stats.main_forwards += 1
        stats.token_forwards += len(alive)
        pos += 1
    stats.decode_seconds += time.perf_counter() - t0
    return outs


def _accept(sampling: Sampling, main_logits: torch.Tensor, draft_probs: torch.Tensor | None, draft: int,
            gen: torch.Generator) -> tuple[bool, int]:
    """Verify one draft against the main model's logits (V,); returns (accepted, token to emit).

    Greedy: accept iff the draft is the argmax. Sampling: accept with probability min(1, p/q),
    else resample from max(p - q, 0) normalised.
    """
    if sampling.greedy:
        best = int(main_logits.argmax())
        return best == draft, best
    p = sampling.probs(main_logits.unsqueeze(0))[0]  # (V,)
    q = draft_probs
    ratio = (p[draft] / q[draft].clamp_min(torch.finfo(torch.float32).tiny)).clamp(max=1.0)
    if torch.rand((), generator=gen, device=p.device) < ratio:
        return True, draft
    residual = (p - q).clamp_min(0)
    residual = residual / residual.sum() if residual.sum() > 0 else p
    return False, int(torch.multinomial(residual, 1, generator=gen)[0])


def _draft(sampling: Sampling, mtp_logits: torch.Tensor, gen: torch.Generator) -> tuple[int, torch.Tensor | None]:
    """A draft token from MTP logits (V,) and its distribution (None when greedy)."""
    if sampling.greedy:
        return int(mtp_logits.argmax()), None
    q = sampling.probs(mtp_logits.unsqueeze(0))[0]  # (V,)
    return int(torch.multinomial(q, 1, generator=gen)[0]), q


def _speculative_one(model: Transformer, prompt: list[int], max_new: int, sampling: Sampling, eos: set[int],
                     gen: torch.Generator, cache_fp8: bool, stats: GenerationStats) -> list[int]:
    """MTP speculative decoding of one prompt (batch 1); the cache rolls back by overwriting."""
    device = model.inv_freq.device
    ids = torch.tensor([prompt], device=device)  # (1, n)
    n = ids.shape[1]
    cache: Cache = model.new_cache(fp8=cache_fp8)
    t0 = time.perf_counter()
    h = model.hidden(ids, 0, cache)  # (1, n, hidden)
    cur = int(sampling.pick(model.head(h[:, -1]), [gen])[0])
    stats.prefill_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    stats.main_forwards += 1
    stats.token_forwards += 1
    out = [cur]
    # MTP over the prompt: row i uses h_i and token i+1 (the last row uses the token just sampled)
    follow = torch.cat([ids[:, 1:], torch.tensor([[cur]], device=device)], dim=1)  # (1, n)
    draft, q = _draft(sampling, model.mtp_step(h, follow, 0, cache, last_only=True)[0, -1], gen)
    pos = n  # slot of `cur`, not yet written to the main cache
    while len(out) < max_new and cur not in eos:
        if len(out) == max_new - 1 or pos + SPEC_TOKENS > model.max_seq_len:  # room for one token only
            logits = model(torch.tensor([[cur]], device=device), pos, cache)[:, -1]  # (1, V)
            out.append(int(sampling.pick(logits, [gen])[0]))
            stats.main_forwards += 1
            stats.token_forwards += 1
            break
        x = torch.tensor([[cur, draft]], device=device)  # (1, 2)
        h = model.hidden(x, pos, cache)  # (1, 2, hidden); writes slots pos, pos + 1
        logits = model.head(h)[0]  # (2, V)
        stats.main_forwards += 1
        stats.token_forwards += 1
        stats.drafted += 1
        ok, tok = _accept(sampling, logits[0], q, draft, gen)
        if ok:
            stats.accepted += 1
            bonus = int(sampling.pick(logits[1:], [gen])[0])
            new = [draft, bonus]
            mtp = model.mtp_step(h, torch.tensor([new], device=device), pos, cache, last_only=True)[0, -1]
        else:  # the draft's slot pos + 1 is overwritten by the next write: the rollback
            new = [tok]
            mtp = model.mtp_step(h[:, :1], torch.tensor([new], device=device), pos, cache, last_only=True)[0, -1]
        out.extend(new)
        pos += len(new)
        cur = new[-1]
        if any(t in eos for t in new):
            break
        draft, q = _draft(sampling, mtp, gen)
    stats.peak_cache_bytes = max(stats.peak_cache_bytes, cache.nbytes())
    stats.decode_seconds += time.perf_counter() - t0
    return out
