"""Functions run on every rank by the multi-process tests (module level: pickled by name).

Each takes the rank's ParallelContext first; the same functions run with SINGLE_PROCESS in the
test process to give the world-size-1 reference.
"""

from __future__ import annotations

import os
import time

import torch

import deepseek_model as dsm
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.checkpoint.schema import split_rule

BATCH, SEQ = 2, 12
PROMPT_LEN, NEW_TOKENS = 5, 6
IDS_SEED = 7


def input_ids(vocab: int) -> torch.Tensor:
    """Fixed (BATCH, SEQ) token ids."""
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(IDS_SEED))


def greedy_decode(model, prompt: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill then n one-token steps through the latent cache: (tokens (B, n), logits (B, n, V))."""
    cache = model.new_cache()
    logits = model(prompt, 0, cache)[:, -1]  # (B, V)
    tokens, steps = [], []
    pos = prompt.shape[1]
    for _ in range(n):
        steps.append(logits)
        nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
        tokens.append(nxt)
        logits = model(nxt, pos, cache)[:, -1]
        pos += 1
    return torch.cat(tokens, 1), torch.stack(steps, 1)


def forward_all(ctx, path: str, attn: str, weights: str = "auto") -> dict[str, torch.Tensor]:
    """Logits for every position, MTP logits and a greedy cached decode of one checkpoint."""
    model = dsm.from_pretrained(path, dtype=torch.float32, attn=attn, weights=weights, parallel=ctx)
    ids = input_ids(model.cfg.vocab_size)
    with torch.no_grad():
        out = {"logits": model(ids)}
        if model.has_mtp:
            out["mtp"] = model.mtp_logits(ids)
        out["tokens"], out["step_logits"] = greedy_decode(model, ids[:, :PROMPT_LEN], NEW_TOKENS)
    out["cache_nbytes"] = torch.tensor(_cache_bytes(model, ids[:, :PROMPT_LEN]))
    return out


def _cache_bytes(model, prompt: torch.Tensor) -> int:
    cache = model.new_cache()
    with torch.no_grad():
        model(prompt, 0, cache)
    return cache.nbytes()


def load_error(ctx, path: str, weights: str = "auto") -> str:
    """Load and return '' on success, else 'ExceptionType: message' (this rank's view)."""
    try:
        dsm.from_pretrained(path, weights=weights, parallel=ctx)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""


def load_or_die(ctx, path: str) -> None:
    """Load; an exception ends this rank's process with a non-zero exit code."""
    dsm.from_pretrained(path, parallel=ctx)


def die_before_collective(ctx, path: str) -> None:
    """Rank 1 exits abruptly before loading; the others must fail in the collective, not hang."""
    if ctx.rank == 1:
        os._exit(3)
    dsm.from_pretrained(path, parallel=ctx)


def reads_during_load(ctx, path: str, weights: str = "auto") -> dict[str, list[str]]:
    """Which tensors this rank read whole (`get`) and which by slice (`get_slice`) while loading."""
    whole, sliced, refused = [], [], []
    orig_get, orig_slice = CheckpointReader.get, CheckpointReader.get_slice

    def get(self, name):
        whole.append(name)
        return orig_get(self, name)

    def get_slice(self, name):
        sliced.append(name)
        return orig_slice(self, name)

    CheckpointReader.get, CheckpointReader.get_slice = get, get_slice
    try:
        dsm.from_pretrained(path, weights=weights, parallel=ctx)
    except ValueError as e:
        refused.append(f"{type(e).__name__}: {e}")
    finally:
        CheckpointReader.get, CheckpointReader.get_slice = orig_get, orig_slice
    return {"whole": whole, "sliced": sliced, "refused": refused}


def split_kind(hf_name: str) -> str:
    """How the converter (and the loader) split a tensor: column, row, replicated or expert."""
    return split_rule(hf_name)[0]



GEN_PROMPTS = [[3, 17, 42, 7, 99], [5, 11]]  # unequal lengths: the left-padded batched path
GEN_NEW_TOKENS = 8
GEN_SEED = 11
GEN_CASES = ((0.0, None), (0.8, None), (0.0, "mtp"), (0.8, "mtp"))  # (temperature, speculative)


def generate_all(ctx, path: str) -> dict[tuple[float, str | None], list[list[int]]]:
    """dsm.generate on this rank, greedy and sampled, plain and MTP-speculative: new tokens per prompt."""
    model = dsm.from_pretrained(path, parallel=ctx)
    out = {}
    for temperature, speculative in GEN_CASES:
        res = dsm.generate(model, GEN_PROMPTS, max_new_tokens=GEN_NEW_TOKENS, temperature=temperature, top_p=0.9,
                           speculative=speculative, seed=GEN_SEED, eos=[])
        out[(temperature, speculative)] = res.tokens
    return out


def stall_before_collective(ctx, path: str, stall_s: float) -> None:
    """Rank 1 stays alive but never joins the collective; rank 0 must time out, not hang."""
    if ctx.rank == 1:
        time.sleep(stall_s)
        os._exit(4)
    dsm.from_pretrained(path, parallel=ctx)
