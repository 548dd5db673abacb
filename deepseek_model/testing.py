"""Deterministic tiny checkpoints in the exact published HF on-disk layout.

`make_tiny_checkpoint` writes config.json (real field names), `model.safetensors.index.json`, several
shards named like the real repository (`model-00001-of-000004.safetensors`), FP8 weights with
`weight_scale_inv` exactly where the published checkpoint has them (some scales in another shard
than their weight), a ragged kv_a_proj_with_mqa, an MTP layer at index num_hidden_layers, and finite
router biases of both signs. Tests and the demo use it; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import save_file

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.convert import names
from deepseek_model.kernels import ops

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARDS = 4
ROUTER_BIAS_RANGE = 0.25  # biases drawn from U(-r, r): both signs, large enough to change routing


def shard_file_name(index: int, total: int) -> str:
    """The published shard name pattern: 5-digit index, 6-digit total (1-based index)."""
    return f"model-{index:05d}-of-{total:06d}.safetensors"


def _config_dict(config: str | dict | ModelConfig, fp8: bool, mtp: bool) -> dict[str, Any]:
    if isinstance(config, ModelConfig):
        d = config.to_dict()
    elif isinstance(config, dict):
        d = dict(config)
    else:
        d = builtin_config_dict(config)
    if fp8:
        d.setdefault("quantization_config", {"activation_scheme": "dynamic", "fmt": "e4m3",
                                             "quant_method": "fp8", "weight_block_size": [128, 128]})
    else:
        d.pop("quantization_config", None)
    if not mtp:
        d["num_nextn_predict_layers"] = 0
    d["torch_dtype"] = "bfloat16"
    return d


def _init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A deterministic fp32 value for one HF tensor, scaled so logits come out O(1)."""
    if name.endswith("e_score_correction_bias"):
        return (torch.rand(shape, generator=gen) * 2 - 1) * ROUTER_BIAS_RANGE
    if len(shape) == 1:  # RMSNorm weights: near one, varied
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = shape[1]
    return torch.randn(shape, generator=gen) / math.sqrt(fan_in)


def make_tiny_tensors(cfg: ModelConfig, fp8: bool = False, seed: int = 0,
                      mtp: bool = True) -> dict[str, torch.Tensor]:
    """The full HF state dict of a random model: bf16 (router bias fp32), or FP8 where published.

    The MTP copies of embed_tokens / shared_head.head equal the main embedding / lm_head byte for
    byte, as in the released checkpoint.
    """
    gen = torch.Generator().manual_seed(seed)
    block = cfg.quantization.block_size[0] if cfg.quantization else ops.reference.BLOCK
    scale_fmt = cfg.quantization.scale_fmt if cfg.quantization else None
    tensors: dict[str, torch.Tensor] = {}
    mtp_prefix = f"model.layers.{cfg.mtp_layer_index}."
    for name, shape in names.hf_weight_shapes(cfg, mtp=mtp).items():
        if name == mtp_prefix + "embed_tokens.weight":
            tensors[name] = tensors["model.embed_tokens.weight"].clone()
            continue
        if name == mtp_prefix + "shared_head.head.weight":
            tensors[name] = tensors["lm_head.weight"].clone()
            continue
        value = _init_tensor(name, shape, gen)
        if name.endswith("e_score_correction_bias"):
            tensors[name] = value.float()
        elif fp8 and names.is_fp8_weight(name):
            q, s = ops.weight_quant(value, block, scale_fmt)
            tensors[name] = q
            tensors[names.scale_name(name)] = s
        else:
            tensors[name] = value.to(torch.bfloat16)
    return tensors


def _assign_shards(tensor_names: list[str], num_shards: int) -> dict[str, int]:
    """Contiguous split into shards; every third scale is moved to the next shard (a weight and
    its scale may live in different files in the real checkpoint)."""
    per = math.ceil(len(tensor_names) / num_shards)
    shard_of = {n: min(i // per, num_shards - 1) for i, n in enumerate(tensor_names)}
    scales = [n for n in tensor_names if names.is_scale_name(n)]
    for i, n in enumerate(scales):
        if i % 3 == 0:
            shard_of[n] = (shard_of[names.weight_of_scale(n)] + 1) % num_shards
    return shard_of


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                     num_shards: int = DEFAULT_SHARDS) -> str:
    """Write tensors as an HF checkpoint directory: shards, index (with total_size), config.json.

    Args:
        out_dir: target directory (created; existing files with the same names are replaced).
        tensors: HF name → tensor.
        config: the config.json dict.
        num_shards: number of safetensors shards.

    Returns:
        The directory path.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensor_names = list(tensors)
    num_shards = max(1, min(num_shards, len(tensor_names)))
    shard_of = _assign_shards(tensor_names, num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for s in range(num_shards):
        fname = shard_file_name(s + 1, num_shards)
        part = {n: tensors[n].contiguous() for n in tensor_names if shard_of[n] == s}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    gen_cfg = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
               "do_sample": False}
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen_cfg, f, indent=2)
    return out_dir


def make_tiny_checkpoint(out_dir: str | os.PathLike, config: str | dict | ModelConfig = "tiny",
                         fp8: bool = False, seed: int = 0, mtp: bool = True,
                         num_shards: int = DEFAULT_SHARDS) -> str:
    """Build a deterministic random checkpoint in the published HF layout.

    Args:
        out_dir: directory to write.
        config: a built-in config name ("tiny", "tiny-v2", "small", ...), an HF config dict or a
            ModelConfig.
        fp8: store the published FP8 tensor set as float8_e4m3fn + weight_scale_inv.
        seed: RNG seed; the same arguments give byte-identical files.
        mtp: include the MTP layer (when the config has num_nextn_predict_layers).
        num_shards: number of shard files.

    Returns:
        The checkpoint directory.
    """
    d = _config_dict(config, fp8, mtp)
    cfg = ModelConfig.from_dict(d, source="config")
    tensors = make_tiny_tensors(cfg, fp8=fp8, seed=seed, mtp=mtp)
    return write_checkpoint(out_dir, tensors, d, num_shards=num_shards)
