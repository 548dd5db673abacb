"""Architecture summary of a config or checkpoint: parameter counts, formats, memory, cache sizes.

Everything is computed from the config and the shard headers; no weight is read.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from deepseek_model.config import ModelConfig
from deepseek_model.convert import names
from deepseek_model.convert.checkpoint import CheckpointReader

BF16_BYTES = 2
FP8_BYTES = 1
SCALE_BYTES = 4
_EXPERT_RE = re.compile(r"\.mlp\.experts\.\d+\.")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total, MTP and per-token active parameter counts (scales not counted).

    Active = every non-routed-expert parameter of the main model plus num_experts_per_tok routed
    experts per MoE layer (the MTP module is excluded from both total and active).
    """
    shapes = names.hf_weight_shapes(cfg, mtp=True)
    mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
    main = {n: s for n, s in shapes.items() if not n.startswith(mtp_prefix)}
    total = sum(_numel(s) for s in main.values())
    mtp = sum(_numel(s) for n, s in shapes.items() if n.startswith(mtp_prefix))
    routed = sum(_numel(s) for n, s in main.items() if _EXPERT_RE.search(n))
    active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return {"total": total, "mtp": mtp, "active": active, "routed_expert": routed}


def weight_bytes(cfg: ModelConfig, fmt: str, mtp: bool = True) -> int:
    """Bytes of the checkpoint in `fmt` ("bf16" or "fp8": the published FP8 tensor set + fp32 scales)."""
    block = cfg.quantization.block_size[0] if cfg.quantization else 128
    total = 0
    for name, shape in names.hf_weight_shapes(cfg, mtp=mtp).items():
        if name.endswith("e_score_correction_bias"):
            total += _numel(shape) * SCALE_BYTES
        elif fmt == "fp8" and names.is_fp8_weight(name):
            total += _numel(shape) * FP8_BYTES + _ceil_div(shape[0], block) * _ceil_div(shape[1], block) * SCALE_BYTES
        else:
            total += _numel(shape) * BF16_BYTES
    return total


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = BF16_BYTES) -> dict[str, int]:
    """KV-cache bytes per token over all layers: the MLA latent vs a per-head K/V cache."""
    latent = cfg.latent_dim * cfg.num_hidden_layers * bytes_per_value
    per_head = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * bytes_per_value
    return {"latent": latent, "per_head_kv": per_head}


def checkpoint_formats(reader: CheckpointReader) -> dict[str, Any]:
    """dtype histogram (tensor count and bytes) and FP8 coverage of a checkpoint, from headers."""
    by_dtype: dict[str, dict[str, int]] = {}
    fp8_weights = fp8_expected = 0
    for name in reader.names():
        dtype = str(reader.dtype(name)).replace("torch.", "")
        entry = by_dtype.setdefault(dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += reader.nbytes(name)
        if names.is_fp8_weight(name):
            fp8_expected += 1
            fp8_weights += reader.dtype(name) == torch.float8_e4m3fn
    return {"dtypes": by_dtype, "fp8_weights": fp8_weights, "fp8_eligible": fp8_expected}


def model_summary(cfg: ModelConfig, reader: CheckpointReader | None = None) -> dict[str, Any]:
    """Everything `deepseek-model inspect` prints, as a dict."""
    counts = parameter_counts(cfg)
    out: dict[str, Any] = {
        "architecture": {
            "hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "dense_layers": sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)),
            "heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank, "kv_lora_rank": cfg.kv_lora_rank,
            "rope": cfg.qk_rope_head_dim, "routed_experts": cfg.n_routed_experts,
            "shared_experts": cfg.n_shared_experts, "experts_per_token": cfg.num_experts_per_tok,
            "routing": f"{cfg.scoring_func}/{cfg.topk_method}", "vocab": cfg.vocab_size,
            "mtp_layers": cfg.num_nextn_predict_layers,
            "yarn_factor": cfg.rope_scaling.factor if cfg.rope_scaling else None,
        },
        "parameters": counts,
        "memory_bytes": {"bf16": weight_bytes(cfg, "bf16"), "fp8": weight_bytes(cfg, "fp8")},
        "cache_bytes_per_token": cache_bytes_per_token(cfg),
    }
    if reader is not None:
        out["checkpoint"] = checkpoint_formats(reader)
        mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
        out["checkpoint"]["mtp_present"] = any(n.startswith(mtp_prefix) for n in reader.names())
        out["checkpoint"]["files"] = len(reader.files)
    return out
