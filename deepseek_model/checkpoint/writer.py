"""Writing a whole in-memory state as an HF checkpoint directory (small models: tests, training).

Large checkpoints are written band by band by the converters (deepseek_model.checkpoint.stream);
this writer holds every tensor in memory, which suits the tiny and mini models: shards named like
the published repository, the index with its total size, config.json and generation_config.json.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import save_file

from deepseek_model.checkpoint.reader import CONFIG_FILE, INDEX_FILE
from deepseek_model.checkpoint.schema import is_scale_name, weight_of_scale

DEFAULT_SHARDS = 4
GENERATION_CONFIG_FILE = "generation_config.json"


def shard_file_name(index: int, total: int) -> str:
    """The published shard name pattern: 5-digit index, 6-digit total (1-based index)."""
    return f"model-{index:05d}-of-{total:06d}.safetensors"


def _assign_shards(tensor_names: list[str], num_shards: int) -> dict[str, int]:
    """Contiguous split into shards; every third scale is moved to the next shard (a weight and
    its scale may live in different files in the real checkpoint)."""
    per = math.ceil(len(tensor_names) / num_shards)
    shard_of = {n: min(i // per, num_shards - 1) for i, n in enumerate(tensor_names)}
    scales = [n for n in tensor_names if is_scale_name(n)]
    for i, n in enumerate(scales):
        if i % 3 == 0:
            shard_of[n] = (shard_of[weight_of_scale(n)] + 1) % num_shards
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
        try:
            save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        except OSError as e:  # disk full, read-only...: name the file
            raise OSError(e.errno, f"{os.path.join(out_dir, fname)}: {e.strerror or e}") from None
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    gen_cfg = {"bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
               "do_sample": False}
    with open(os.path.join(out_dir, GENERATION_CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(gen_cfg, f, indent=2)
    return out_dir
