"""Tile configurations for the Triton GEMMs, read from tiles.json (data, not a run-time autotuner).

A config is chosen by (N, K, M bucket); shapes not in the table use the "default" entry of the
same bucket. `check_tile` holds the GPU-legality rules the interpreter does not enforce.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from deepseek_model.constants import is_pow2

TILES_FILE = Path(__file__).with_name("tiles.json")
M_BUCKETS = ((16, "m16"), (32, "m32"), (64, "m64"), (128, "m128"))
LARGE_BUCKET = "large"
MIN_DOT_DIM = 16  # tl.dot needs every tile dimension >= 16
MIN_FP8_DOT_K = 32  # fp8 tl.dot needs K >= 32 on NVIDIA GPUs
SMEM_BYTES = 227 * 1024  # H100 max dynamic shared memory per block
FP8_BYTES = 1


@dataclass(frozen=True)
class TileConfig:
    """One GEMM tile configuration (BLOCK_K is the quantization block, passed separately)."""

    BLOCK_M: int
    BLOCK_N: int
    GROUP_M: int = 1  # M tiles per launch-order super-block (L2 reuse of the weight tiles)
    SPLIT_K: int = 1  # K slices summed by a second kernel (more programs for small M)
    num_warps: int = 4
    num_stages: int = 3


def m_bucket(m: int) -> str:
    """Name of the M bucket holding `m` rows."""
    for limit, name in M_BUCKETS:
        if m <= limit:
            return name
    return LARGE_BUCKET


@functools.lru_cache(maxsize=None)
def _table(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def get_tile(n: int, k: int, m: int, path: Path = TILES_FILE) -> TileConfig:
    """Config for C[M, N] = A[M, K]·W[N, K]ᵀ from the table (shape entry, else the default)."""
    table = _table(str(path))
    bucket = m_bucket(m)
    entry = table.get("shapes", {}).get(f"{n}x{k}", {}).get(bucket)
    if entry is None:
        entry = table["default"][bucket]
    return TileConfig(**entry)


def format_tiles(table: dict) -> str:
    """tiles.json text: one space of indent per level, every config (a dict of scalars) on one line."""

    def dump(obj: object, level: int) -> str:
        if not isinstance(obj, dict) or not any(isinstance(v, dict) for v in obj.values()):
            return json.dumps(obj, ensure_ascii=False)
        pad = " " * (level + 1)
        items = [f"{pad}{json.dumps(k)}: {dump(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * level + "}"

    return dump(table, 0) + "\n"


def write_tiles(table: dict, path: Path, block_k: int) -> None:
    """Write a tile table (the layout get_tile reads) after checking every config; atomic replace.

    Args:
        table: {"default": {bucket: cfg}, "shapes": {"NxK": {bucket: cfg}}, "moe": {bucket: cfg}}
            plus any "_"-prefixed note keys; cfg a dict of TileConfig fields.
        path: destination JSON file.
        block_k: the K tile the configs are checked with (the quantization block).
    """
    for entry in _entries(table):
        check_tile(TileConfig(**entry), block_k)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_tiles(table), encoding="utf-8")
    tmp.replace(path)
    _table.cache_clear()


def get_moe_tile(rows_per_expert: int, path: Path = TILES_FILE) -> TileConfig:
    """Fused-MoE grouped-GEMM config by the average rows (routed pairs) one expert receives."""
    entry = _table(str(path))["moe"][m_bucket(rows_per_expert)]
    return TileConfig(**entry)


def all_tiles(path: Path = TILES_FILE) -> list[TileConfig]:
    """Every distinct config in the table (default, per-shape and MoE entries)."""
    return list(dict.fromkeys(TileConfig(**e) for e in _entries(_table(str(path)))))


def _entries(table: dict) -> list[dict]:
    """Every config dict of a table: default, MoE (not its "_" notes) and per-shape entries."""
    entries = list(table["default"].values())
    entries += [v for k, v in table["moe"].items() if not k.startswith("_")]
    return entries + [cfg for shape in table["shapes"].values() for cfg in shape.values()]


def check_tile(cfg: TileConfig, block_k: int) -> None:
    """Raise ValueError if `cfg` with K tile `block_k` could not compile/run on an NVIDIA GPU.

    The interpreter accepts all of these; a GPU does not: power-of-two tiles, dot dims >= 16,
    fp8 dot K >= 32, pipelined fp8 tiles within shared memory, power-of-two warp counts.
    """
    for name in ("BLOCK_M", "BLOCK_N"):
        v = getattr(cfg, name)
        if not is_pow2(v) or v < MIN_DOT_DIM:
            raise ValueError(f"{name}: expected a power of two >= {MIN_DOT_DIM}, got {v}")
    if not is_pow2(block_k) or block_k < MIN_FP8_DOT_K:
        raise ValueError(f"block_k: fp8 tl.dot needs a power-of-two K tile >= {MIN_FP8_DOT_K}, got {block_k}")
    if cfg.GROUP_M < 1 or cfg.SPLIT_K < 1 or cfg.num_stages < 1:
        raise ValueError(f"GROUP_M/SPLIT_K/num_stages: expected >= 1, got {cfg}")
    if not is_pow2(cfg.num_warps):
        raise ValueError(f"num_warps: expected a power of two, got {cfg.num_warps}")
    smem = cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * block_k * FP8_BYTES
    if smem > SMEM_BYTES:
        raise ValueError(f"num_stages: {cfg} needs {smem} B of shared memory > {SMEM_BYTES}")
