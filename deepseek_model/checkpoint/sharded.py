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
from deepseek_model.checkpoint.schema import SPLIT_DIM, SPLIT_EXPERT, SPLIT_KINDS, SPLIT_REPLICATED, SPLIT_ROW
from deepseek_model.checkpoint.stream import DTYPE_OF_CODE, SourceReader, TensorSpec

MANIFEST_FILE = "tp_manifest.json"
MANIFEST_FORMAT = "deepseek-model-tp"
MANIFEST_VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"  # every shard a manifest names (rank files and hf_index) ends so


def rank_file_name(rank: int, world_size: int) -> str:
    """`model-rank-00000-of-00008.safetensors`."""
    return f"model-rank-{rank:05d}-of-{world_size:05d}.safetensors"


def is_sharded_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a sharded checkpoint (has the manifest)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_FILE))


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the manifest of a sharded directory.

    Every field merge, verify and the loader use is checked here, before any rank file is opened
    (see `validate_manifest`).

    Args:
        path: the sharded directory.

    Returns:
        The manifest dict (see the module docstring).

    Raises:
        CheckpointError: missing, unreadable or inconsistent manifest (one line naming the manifest
            and the field or tensor at fault).
    """
    mpath = os.path.join(os.fspath(path), MANIFEST_FILE)
    manifest = read_json_file(mpath, missing="missing (not a sharded checkpoint)")
    validate_manifest(manifest, mpath)
    return manifest


def validate_manifest(manifest: Any, mpath: str) -> None:
    """Check a parsed manifest: top-level fields, every tensor entry, the rank maps and hf_index.

    Args:
        manifest: the parsed tp_manifest.json.
        mpath: its path, for messages.

    Raises:
        CheckpointError: the first problem found, naming `mpath` and the field or tensor.
    """
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{mpath}: not a {MANIFEST_FORMAT} manifest")
    n = _check_top_level(manifest, mpath)
    tensors = manifest["tensors"]
    for name, info in tensors.items():
        _check_tensor_entry(name, info, n, mpath)
    for r, entry in enumerate(manifest["ranks"]):
        _check_rank_entry(r, entry, tensors, mpath)
    hf_index = manifest.get("hf_index")
    if hf_index is not None:
        hf_map = hf_index.get("weight_map") if isinstance(hf_index, dict) else None
        if not isinstance(hf_map, dict):
            raise CheckpointError(f"{mpath}: hf_index has no 'weight_map' object")
        _check_names(hf_map, mpath, "hf_index")
        _check_same_tensors(hf_map, tensors, mpath, "hf_index")


def _is_int(value: Any) -> bool:
    """A JSON integer (bool is not one, though Python says it is an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_top_level(manifest: dict[str, Any], mpath: str) -> int:
    """Check version, world_size, block_size, config, tensors and ranks; returns the world size."""
    version = manifest.get("version")
    if version != MANIFEST_VERSION or not _is_int(version):
        raise CheckpointError(f"{mpath}: 'version' is {version!r}; this package reads version {MANIFEST_VERSION}")
    n = manifest.get("world_size")
    if not (_is_int(n) and n >= 1):
        raise CheckpointError(f"{mpath}: 'world_size' must be a positive integer, got {n!r}")
    block = manifest.get("block_size")
    if not (_is_int(block) and block >= 1):
        raise CheckpointError(f"{mpath}: 'block_size' must be a positive integer, got {block!r}")
    if not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{mpath}: no 'config' object (the source's config.json)")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{mpath}: no 'tensors' object")
    if not tensors:
        raise CheckpointError(f"{mpath}: 'tensors' is empty (a sharded checkpoint holds at least one tensor)")
    ranks = manifest.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != n:
        got = f"{len(ranks)} entries" if isinstance(ranks, list) else repr(ranks)
        raise CheckpointError(f"{mpath}: world_size and ranks disagree ('ranks' must list {n} ranks, got {got})")
    return n


def _check_tensor_entry(name: str, info: Any, n: int, mpath: str) -> None:
    """One entry of "tensors": known dtype, shape of non-negative ints, split and dim that fit the shape.

    Args:
        name: HF tensor name.
        info: its manifest entry {"dtype", "shape", "split", "dim"[, "rank"]}.
        n: the world size (a split dimension must divide by it; an expert's owner is below it).
        mpath: the manifest path, for messages.
    """
    where = f"{mpath}: tensor '{name}'"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry {info!r} is not an object")
    for field in ("dtype", "shape", "split"):
        if field not in info:
            raise CheckpointError(f"{where} has no '{field}' field")
    if info["split"] not in SPLIT_KINDS:
        raise CheckpointError(f"{where} has unknown split {info['split']!r} (one of {', '.join(SPLIT_KINDS)})")
    dtype, shape, split, dim = info["dtype"], info["shape"], info["split"], info.get("dim")
    if dtype not in DTYPE_OF_CODE:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r} (one of {', '.join(DTYPE_OF_CODE)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    want_dim = SPLIT_DIM.get(split)
    if dim != want_dim or (dim is not None and not _is_int(dim)):
        raise CheckpointError(f"{where}: split '{split}' needs dim {want_dim}, got {dim!r}")
    if want_dim is not None and len(shape) <= want_dim:
        raise CheckpointError(f"{where}: split '{split}' cuts dim {want_dim}, but shape {shape} has "
                              f"{len(shape)} dimension{'s' if len(shape) != 1 else ''}")
    if want_dim is not None and shape[want_dim] % n:
        raise CheckpointError(f"{where}: split '{split}' cuts dim {want_dim} of shape {shape} into {n} parts, "
                              f"but {shape[want_dim]} is not divisible by {n}")
    owner = info.get("rank")
    if split == SPLIT_EXPERT and not (_is_int(owner) and 0 <= owner < n):
        raise CheckpointError(f"{where} is owned by rank {owner!r}, outside world size {n}")


def _check_rank_entry(r: int, entry: Any, tensors: dict[str, dict[str, Any]], mpath: str) -> None:
    """One entry of "ranks": its number, file names, and exactly the tensors rank `r` holds."""
    wmap = entry.get("weight_map") if isinstance(entry, dict) else None
    if not isinstance(wmap, dict):
        raise CheckpointError(f"{mpath}: rank {r} has no 'weight_map' object")
    if entry.get("rank") != r or not _is_int(entry.get("rank")):
        raise CheckpointError(f"{mpath}: entry {r} of 'ranks' says rank {entry.get('rank')!r}")
    _check_names(wmap, mpath, f"rank {r}")
    held = {name: None for name, info in tensors.items() if info["split"] != SPLIT_EXPERT or info["rank"] == r}
    _check_same_tensors(wmap, held, mpath, f"rank {r}")


def _check_same_tensors(weight_map: dict[str, Any], want: dict[str, Any], mpath: str, where: str) -> None:
    """`weight_map` names exactly the tensors of `want` (the ones "tensors" places there)."""
    extra = [name for name in weight_map if name not in want]
    if extra:
        raise CheckpointError(f"{mpath}: {where} maps tensor '{extra[0]}', which 'tensors' does not place there")
    missing = [name for name in want if name not in weight_map]
    if missing:
        raise CheckpointError(f"{mpath}: {where} does not map tensor '{missing[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _check_names(weight_map: dict[str, Any], mpath: str, where: str) -> None:
    """Every file a manifest names is a safetensors file inside its directory (merge writes these names
    into DST), and none is a file the directory holds for another purpose."""
    for name, fname in weight_map.items():
        if not is_plain_file_name(fname):
            raise CheckpointError(f"{mpath}: {where} maps tensor '{name}' to {fname!r}, which is not a file name "
                                  f"inside the directory")
        if not fname.endswith(SAFETENSORS_SUFFIX):  # never config.json, the index or the manifest
            raise CheckpointError(f"{mpath}: {where} maps tensor '{name}' to {fname!r}, which is not a "
                                  f"{SAFETENSORS_SUFFIX} shard name")


def part_shape(info: dict[str, Any], world_size: int) -> tuple[int, ...]:
    """The shape one rank holds of a (validated) manifest tensor entry: dim `info["dim"]` divided by N."""
    shape = list(info["shape"])
    if info["dim"] is not None:
        shape[info["dim"]] //= world_size
    return tuple(shape)


def check_rank_file(reader: CheckpointReader, manifest: dict[str, Any], rank: int) -> None:
    """Compare every tensor a rank's files hold with the part the manifest says they hold.

    A manifest shape larger than the file's would make merge read the neighbouring tensor's bytes.

    Args:
        reader: the RankReader of rank `rank` (its files' headers are read and validated here).
        manifest: the validated manifest.
        rank: the rank number.

    Raises:
        CheckpointError: a file lacks a tensor, or holds another dtype or shape than the manifest's part.
    """
    mpath = os.path.join(reader.path, MANIFEST_FILE)
    n = manifest["world_size"]
    for name, fname in reader.weight_map.items():
        info = manifest["tensors"][name]
        entry = reader.header(fname).get(name)
        fpath = os.path.join(reader.path, fname)
        if entry is None:
            raise CheckpointError(f"{fpath}: does not contain tensor '{name}' ({MANIFEST_FILE} rank {rank} says it does)")
        want = (info["dtype"], part_shape(info, n))
        got = (entry["dtype"], tuple(entry["shape"]))
        if got != want:
            raise CheckpointError(f"{mpath}: tensor '{name}' ({info['split']} of {info['dtype']} {info['shape']}) "
                                  f"means rank {rank} holds {want[0]} {list(want[1])}, but {fname} holds "
                                  f"{got[0]} {list(got[1])}")


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
    check_rank_file(reader, manifest, rank)  # headers validated (truncation) and matched before reading
    out: dict[str, torch.Tensor] = {}
    for fname in reader.files:
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
        for r, rank in enumerate(self.ranks):  # every part's dtype and shape, before any read
            check_rank_file(rank.reader, self.manifest, r)

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
        if stop <= start:  # nothing to read (e.g. a tensor with no rows): rank 0's empty band
            return self.ranks[0].read_rows(name, 0, 0)  # (0, ...)
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
