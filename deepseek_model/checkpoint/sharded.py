"""Reading the tensor/expert-parallel sharded form written by `convert shard`.

A sharded directory holds `tp_manifest.json`, one safetensors file per rank
(`model-rank-00000-of-00008.safetensors`), config.json and the other files of the source. Rank files
keep the HF tensor names; a split tensor holds that rank's slice. The manifest says how:

```
{"format": "deepseek-model-tp", "version": 1, "world_size": N, "block_size": 128,
 "config": {...config.json...},
 "hf_index": {"metadata": ..., "weight_map": {...}},          # the source layout, used by merge
 "tensors": {hf_name: {"dtype": "BF16", "shape": [full shape], "split": "column" | "row" |
             "replicated" | "expert", "dim": 0 | 1 | null, "rank": owner rank (experts only)}},
 "ranks": [{"rank": r, "weight_map": {hf_name: file}, "total_size": bytes}, ...]}
```

"column" tensors are cut along dim 0 into N equal parts (rank r holds part r), "row" tensors along
dim 1, "replicated" ones are whole on every rank, and routed experts are whole on rank
e // (n_routed_experts / N) only. A weight's `weight_scale_inv` is split the same way.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from safetensors import safe_open

from deepseek_model.checkpoint.reader import CheckpointError, CheckpointReader, is_plain_file_name, read_json_file
from deepseek_model.checkpoint.schema import SPLIT_EXPERT, SPLIT_KINDS, SPLIT_REPLICATED, SPLIT_ROW
from deepseek_model.checkpoint.stream import DTYPE_OF_CODE, SourceReader, TensorSpec

MANIFEST_FILE = "tp_manifest.json"
MANIFEST_FORMAT = "deepseek-model-tp"
MANIFEST_VERSION = 1


def rank_file_name(rank: int, world_size: int) -> str:
    """`model-rank-00000-of-00008.safetensors`."""
    return f"model-rank-{rank:05d}-of-{world_size:05d}.safetensors"


def is_sharded_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a sharded checkpoint (has the manifest)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_FILE))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the manifest of a sharded directory.

    Args:
        path: the sharded directory.

    Returns:
        The manifest dict (see the module docstring).

    Raises:
        CheckpointError: missing, unreadable or inconsistent manifest.
    """
    mpath = os.path.join(os.fspath(path), MANIFEST_FILE)
    manifest = read_json_file(mpath, missing="missing (not a sharded checkpoint)")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    n = manifest.get("world_size")
    ranks = manifest.get("ranks")
    if not isinstance(n, int) or n < 1 or not isinstance(ranks, list) or len(ranks) != n:
        raise CheckpointError(f"{mpath}: world_size and ranks disagree")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{mpath}: no 'tensors' object")
    for name, info in tensors.items():
        if not isinstance(info, dict) or info.get("split") not in SPLIT_KINDS:
            raise CheckpointError(f"{mpath}: tensor '{name}' has unknown split "
                                  f"{info.get('split') if isinstance(info, dict) else info!r}")
        owner = info.get("rank")
        if info["split"] == SPLIT_EXPERT and not (isinstance(owner, int) and 0 <= owner < n):
            raise CheckpointError(f"{mpath}: tensor '{name}' is owned by rank {owner!r}, outside world size {n}")
    for r, entry in enumerate(ranks):
        wmap = entry.get("weight_map") if isinstance(entry, dict) else None
        if not isinstance(wmap, dict):
            raise CheckpointError(f"{mpath}: rank {r} has no 'weight_map' object")
        _check_names(wmap, mpath, f"rank {r}")
    hf_index = manifest.get("hf_index")
    if hf_index is not None:
        hf_map = hf_index.get("weight_map") if isinstance(hf_index, dict) else None
        if not isinstance(hf_map, dict):
            raise CheckpointError(f"{mpath}: hf_index has no 'weight_map' object")
        _check_names(hf_map, mpath, "hf_index")
    return manifest


def _check_names(weight_map: dict[str, Any], mpath: str, where: str) -> None:
    """Every file a manifest names stays inside its directory (merge writes these names into DST)."""
    for name, fname in weight_map.items():
        if not is_plain_file_name(fname):
            raise CheckpointError(f"{mpath}: {where} maps tensor '{name}' to {fname!r}, which is not a file name "
                                  f"inside the directory")


class RankReader(CheckpointReader):
    """A CheckpointReader over one rank's files (the weight map comes from the manifest)."""

    def __init__(self, path: str | os.PathLike, weight_map: dict[str, str]):
        self._manifest_map = dict(weight_map)
        super().__init__(path)

    def _read_weight_map(self) -> dict[str, str]:
        return self._checked_weight_map(self._manifest_map, os.path.join(self.path, MANIFEST_FILE))


def load_rank(path: str | os.PathLike, rank: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load the tensors of one rank of a sharded checkpoint.

    Args:
        path: the sharded directory written by `convert shard`.
        rank: 0 ≤ rank < world_size.
        device: where to put the tensors.

    Returns:
        {HF tensor name: this rank's slice (or the whole tensor if replicated / an owned expert)}.
        Use `read_manifest(path)["tensors"][name]` to see how each was split.

    Raises:
        CheckpointError: bad manifest, rank out of range, missing or corrupt rank file.
    """
    path = os.fspath(path)
    manifest = read_manifest(path)
    if not 0 <= rank < manifest["world_size"]:
        raise CheckpointError(f"{path}: rank {rank} outside world size {manifest['world_size']}")
    reader = RankReader(path, manifest["ranks"][rank]["weight_map"])
    out: dict[str, torch.Tensor] = {}
    for fname in reader.files:
        reader.header(fname)  # validate (truncation) before reading
        with safe_open(os.path.join(path, fname), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if reader.weight_map.get(name) == fname:
                    out[name] = f.get_tensor(name)
    missing = set(reader.weight_map) - set(out)
    if missing:
        raise CheckpointError(f"{path}: rank {rank} file lacks tensor '{sorted(missing)[0]}'")
    return out


class ShardedSource:
    """Full (merged) tensors of a sharded directory, read in row bands without holding a rank.

    Offers the same reading interface as `stream.SourceReader` (names, spec, read_rows, read),
    so merge and verify treat both forms alike.

    Args:
        path: the sharded directory.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self.manifest = read_manifest(self.path)
        self.world_size = self.manifest["world_size"]
        self.tensors: dict[str, dict[str, Any]] = self.manifest["tensors"]
        self.ranks = [SourceReader(RankReader(self.path, r["weight_map"])) for r in self.manifest["ranks"]]
        for rank in self.ranks:
            for fname in rank.reader.files:
                rank.reader.header(fname)

    def names(self) -> list[str]:
        """Full tensor names in manifest order."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def spec(self, name: str) -> TensorSpec:
        """dtype and full (unsplit) shape."""
        info = self.tensors[name]
        return TensorSpec(name, DTYPE_OF_CODE[info["dtype"]], tuple(info["shape"]))

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the merged tensor."""
        info = self.tensors[name]
        full = self.spec(name)
        stop = full.rows if stop is None else stop
        split = info["split"]
        if split == SPLIT_REPLICATED:
            return self.ranks[0].read_rows(name, start, stop)
        if split == SPLIT_EXPERT:
            return self.ranks[info["rank"]].read_rows(name, start, stop)
        if split == SPLIT_ROW:  # every rank holds some columns of every row
            return torch.cat([r.read_rows(name, start, stop) for r in self.ranks], dim=1)  # (stop-start, C)
        per = full.rows // self.world_size  # column split: rank r holds rows [r·per, (r+1)·per)
        parts = []
        for r in range(start // per, (stop - 1) // per + 1):
            lo, hi = max(start, r * per), min(stop, (r + 1) * per)
            parts.append(self.ranks[r].read_rows(name, lo - r * per, hi - r * per))
        return torch.cat(parts, dim=0)  # (stop-start, ...)

    def read(self, name: str) -> torch.Tensor:
        """The whole merged tensor."""
        return self.read_rows(name)

    def close(self) -> None:
        """Close the rank files."""
        for r in self.ranks:
            r.close()
            r.reader.close()
