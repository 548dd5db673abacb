"""Memory estimates made before allocating: what a build or load needs vs what this process can get.

`available_bytes()` is the smaller of the system's MemAvailable and the room left under this
process's address-space limit (`ulimit -v`), so a refusal comes before the allocation that would be
killed. `model_bytes` counts parameters from the checkpoint schema, never by building anything.
"""

from __future__ import annotations

import os
import resource
from typing import Any

from deepseek_model.checkpoint import schema
from deepseek_model.constants import FP8_BLOCK, SCALE_DTYPE_BYTES, block_grid

HEADROOM = 1.10  # activations, temporaries and the allocator's slack on top of the weights
FP8_BYTES = 1
CACHE_PEAK = 3  # a cache growing by doubling holds up to 2x its content, plus the old copy while it grows
ACTIVATION_COPIES = 16  # live (tokens, width) activations of a forward: residual, norms, projections, MLP halves


class InsufficientMemory(ValueError):
    """A build or load would need more memory than this process can get (the message says both)."""


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _address_space_room() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        used = 0
    return max(soft - used, 0)


def address_space_limited() -> bool:
    """Whether this process runs under an address-space limit (`ulimit -v`), where memory-mapped
    files count against the room as much as allocations do."""
    return _address_space_room() is not None


def available_bytes() -> int | None:
    """Bytes this process can still allocate (None when the system does not say)."""
    known = [b for b in (_meminfo_available(), _address_space_room()) if b is not None]
    return min(known) if known else None


def model_bytes(cfg: Any, dtype_bytes: int, fp8: bool = False, mtp: bool = True, block: int = FP8_BLOCK) -> int:
    """Bytes of a model's parameters: `dtype_bytes` per weight, or 1 byte plus fp32 block scales for
    the weights the FP8 layout quantizes."""
    total = 0
    for _, shape, fam in schema.hf_weights(cfg, mtp=mtp):
        numel = 1
        for d in shape:
            numel *= d
        if fp8 and fam.fp8:
            grid = block_grid(shape, block)
            total += numel * FP8_BYTES + grid[0] * grid[1] * SCALE_DTYPE_BYTES
        else:
            total += numel * (4 if fam.keep_fp32 else dtype_bytes)
    return total


def require(nbytes: int, what: str) -> None:
    """Raise InsufficientMemory when `nbytes` (plus headroom) exceeds what this process can get.

    Args:
        nbytes: the estimate.
        what: what needs it, for the message (e.g. "building the deepseek-v3 checkpoint").
    """
    need = int(nbytes * HEADROOM)
    have = available_bytes()
    if have is not None and need > have:
        raise InsufficientMemory(f"{what} needs about {need / 2**30:.1f} GiB, but only {have / 2**30:.1f} GiB "
                                 f"is available to this process")


def generation_bytes(cfg: Any, batch: int, prompt_len: int, total_len: int, value_bytes: int,
                     cache_fp8: bool = False) -> int:
    """Working memory of generating `total_len` positions for `batch` rows after a `prompt_len`
    prefill: the latent caches of every layer (and a V3.2 model's index keys) at their growth peak,
    the prefill's additive (T, S) float32 mask, and its activations.

    Args:
        cfg: the model config.
        batch: rows decoded together.
        prompt_len: the longest prompt.
        total_len: prompt plus new tokens.
        value_bytes: bytes of the compute dtype.
        cache_fp8: latents (and index keys) stored in float8 with one fp32 scale per token.
    """
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    stored = FP8_BYTES if cache_fp8 else value_bytes
    scale = SCALE_DTYPE_BYTES if cache_fp8 else 0
    per_token = cfg.kv_lora_rank * stored + scale + cfg.qk_rope_head_dim * value_bytes
    if cfg.has_indexer:
        per_token += cfg.index_head_dim * stored + scale
    cache = CACHE_PEAK * batch * total_len * layers * per_token
    mask = 4 * batch * prompt_len * prompt_len
    width = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.qk_head_dim)
    activations = ACTIVATION_COPIES * batch * prompt_len * width * 4
    return cache + mask + activations


def training_bytes(cfg: Any, params: int, batch: int, seq_len: int) -> int:
    """Working memory of a training step: fp32 weights, gradients and AdamW's two moments
    (16 bytes a parameter), and one micro-batch's saved activations: per layer (and the MTP layer)
    ACTIVATION_COPIES (tokens, width) fp32 tensors, and the next-token and MTP logits with their
    gradients."""
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    width = max(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.qk_head_dim)
    tokens = batch * seq_len
    logits = (1 + cfg.num_nextn_predict_layers) * 3 * tokens * cfg.vocab_size * 4
    return 16 * params + layers * ACTIVATION_COPIES * tokens * width * 4 + logits
