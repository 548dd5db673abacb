"""Architecture summary of a config or checkpoint: parameter counts, formats, memory, cache sizes.

Everything is computed from the config and the shard headers; no weight is read. For a
tensor/expert-parallel world size, `per_rank_weight_bytes` applies the split rules the converter
and the loader use (column/row splits cut a tensor and its FP8 scale into equal parts, routed
experts are whole on one rank, everything else is replicated) and says whether the split is legal.
"""

from __future__ import annotations

from typing import Any

from deepseek_model.config import ModelConfig
from deepseek_model import memory
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.schema import SPLIT_DIM, SPLIT_EXPERT, SPLIT_REPLICATED, split_problems
from deepseek_model.constants import FP8_BLOCK, ceil_div

BF16_BYTES = 2
FP8_BYTES = 1
SCALE_BYTES = 4  # fp32 block scales
FP32_BYTES = 4


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total, MTP and per-token active parameter counts (scales not counted).

    Active = every non-routed-expert parameter of the main model plus num_experts_per_tok routed
    experts per MoE layer (the MTP module is excluded from both total and active). `indexer`: the
    main model's DeepSeek-V3.2 lightning-indexer parameters (0 without one).
    """
    tensors = schema.hf_weights(cfg, mtp=True)
    mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
    main = [(n, s, fam) for n, s, fam in tensors if not n.startswith(mtp_prefix)]
    total = sum(_numel(s) for _, s, _ in main)
    mtp = sum(_numel(s) for n, s, _ in tensors if n.startswith(mtp_prefix))
    routed = sum(_numel(s) for _, s, fam in main if fam.per_expert)
    active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    indexer = sum(_numel(s) for n, s, _ in main if ".indexer." in n)
    return {"total": total, "mtp": mtp, "active": active, "routed_expert": routed, "indexer": indexer}


def weight_bytes(cfg: ModelConfig, fmt: str, mtp: bool = True) -> int:
    """Bytes of the checkpoint in `fmt` ("bf16" or "fp8": the published FP8 tensor set + fp32 scales)."""
    block = cfg.quantization.block_size[0] if cfg.quantization else FP8_BLOCK
    return memory.model_bytes(cfg, BF16_BYTES, fp8=fmt == "fp8", mtp=mtp, block=block)


def _tensor_bytes(fam: schema.TensorFamily, shape: tuple[int, ...], fmt: str, block: int, parts: int = 1,
                  dim: int | None = None) -> int:
    """Bytes of one tensor (plus its FP8 scale) in `fmt`, or of one of `parts` equal parts along `dim`."""
    if fam.keep_fp32:
        return _numel(shape) * FP32_BYTES
    local = list(shape)
    if dim is not None:
        local[dim] //= parts
    if fmt == "fp8" and fam.fp8:
        grid = [ceil_div(d, block) for d in shape]  # the scale is cut with its weight
        if dim is not None:
            grid[dim] //= parts
        return _numel(tuple(local)) * FP8_BYTES + _numel(tuple(grid)) * SCALE_BYTES
    return _numel(tuple(local)) * BF16_BYTES


def per_rank_weight_bytes(cfg: ModelConfig, world_size: int, mtp: bool = True) -> dict[str, Any]:
    """Weight bytes one rank holds under tensor + expert parallelism over `world_size` ranks.

    Column/row-split tensors (q_b / q_proj, kv_b, o_proj, dense and shared-expert MLPs, embedding,
    head) hold 1/world of their elements and scale blocks; each rank holds n_routed_experts/world
    whole routed experts; norms, q_a / kv_a, routers and eh_proj are replicated. All ranks hold the
    same amount (the splits are even).

    Returns:
        {"world_size", "bf16": {"split", "experts", "replicated", "total"}, "fp8": {...},
        "valid": {"bf16": bool, "fp8": bool}, "problems": {"bf16": [...], "fp8": [...]}}; the
        problems say why a world size cannot split the model (FP8 adds the 128-block rule, which
        also binds an FP8 checkpoint dequantized at load: its scales are sliced with the weights).
    """
    block = cfg.quantization.block_size[0] if cfg.quantization else FP8_BLOCK
    out: dict[str, Any] = {"world_size": world_size}
    for fmt in ("bf16", "fp8"):
        parts = {"split": 0, "experts": 0, "replicated": 0}
        for _, shape, fam in schema.hf_weights(cfg, mtp=mtp):
            if fam.split == SPLIT_EXPERT:
                parts["experts"] += _tensor_bytes(fam, shape, fmt, block)
            elif fam.split == SPLIT_REPLICATED:
                parts["replicated"] += _tensor_bytes(fam, shape, fmt, block)
            else:
                parts["split"] += _tensor_bytes(fam, shape, fmt, block, world_size, SPLIT_DIM[fam.split])
        parts["experts"] //= max(world_size, 1)  # E/world whole experts per rank
        parts["total"] = sum(parts.values())
        out[fmt] = parts
    out["problems"] = {"bf16": split_problems(cfg, world_size, None), "fp8": split_problems(cfg, world_size, block)}
    out["valid"] = {fmt: not problems for fmt, problems in out["problems"].items()}
    return out


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = BF16_BYTES) -> dict[str, int]:
    """KV-cache bytes per token over all layers: the MLA latent vs a per-head K/V cache, and (a
    DeepSeek-V3.2 model) the index keys, exact (`bytes_per_value` each) or FP8 (one byte each plus
    one fp32 scale per token)."""
    layers = cfg.num_hidden_layers
    latent = cfg.latent_dim * layers * bytes_per_value
    per_head = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * layers * bytes_per_value
    out = {"latent": latent, "per_head_kv": per_head}
    if cfg.has_indexer:
        out["index_keys"] = cfg.index_head_dim * layers * bytes_per_value
        out["index_keys_fp8"] = (cfg.index_head_dim * FP8_BYTES + SCALE_BYTES) * layers
    return out


def checkpoint_formats(reader: CheckpointReader) -> dict[str, Any]:
    """dtype histogram (tensor count and bytes) and FP8 coverage of a checkpoint, from headers."""
    by_dtype: dict[str, dict[str, int]] = {}
    fp8_weights = fp8_expected = 0
    for name in reader.names():
        dtype = str(reader.dtype(name)).replace("torch.", "")
        entry = by_dtype.setdefault(dtype, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += reader.nbytes(name)
        if schema.is_fp8_weight(name):
            fp8_expected += 1
            fp8_weights += dtype == "float8_e4m3fn"
    return {"dtypes": by_dtype, "fp8_weights": fp8_weights, "fp8_eligible": fp8_expected}


def model_summary(cfg: ModelConfig, reader: CheckpointReader | None = None,
                  world_sizes: tuple[int, ...] = ()) -> dict[str, Any]:
    """Everything `deepseek-model inspect` prints, as a dict (`parallel`: one per_rank_weight_bytes
    entry per requested world size)."""
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
            "sparse_attention": {"index_heads": cfg.index_n_heads, "index_head_dim": cfg.index_head_dim,
                                 "index_topk": cfg.index_topk} if cfg.has_indexer else None,
        },
        "parameters": counts,
        "memory_bytes": {"bf16": weight_bytes(cfg, "bf16"), "fp8": weight_bytes(cfg, "fp8")},
        "cache_bytes_per_token": cache_bytes_per_token(cfg),
    }
    if world_sizes:
        out["parallel"] = [per_rank_weight_bytes(cfg, n) for n in world_sizes]
    if reader is not None:
        out["checkpoint"] = checkpoint_formats(reader)
        mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
        out["checkpoint"]["mtp_present"] = any(n.startswith(mtp_prefix) for n in reader.names())
        out["checkpoint"]["files"] = len(reader.files)
    return out
