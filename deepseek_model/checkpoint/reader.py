"""Read-only access to an HF safetensors checkpoint directory through its index.

Shards are memory-mapped (safetensors `safe_open`) and opened lazily, once each. Every failure is a
`CheckpointError` whose one-line message names the file or tensor at fault: a missing or invalid
index, an index naming a file outside the directory, a missing, truncated or corrupt shard, or a
tensor the index places in a shard that does not hold it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors import safe_open

from deepseek_model.checkpoint.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# The safetensors dtype codes this package reads and writes (headers and the shard manifest).
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
    torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
DTYPE_OF_CODE: dict[str, torch.dtype] = {code: dtype for dtype, code in DTYPE_CODES.items()}
HEADER_LEN_BYTES = 8


def read_safetensors_header(path: str) -> dict[str, Any]:
    """Parse and validate a safetensors header without reading tensor data.

    Checks that the file is long enough for every tensor's data span (a truncated download is
    caught here, before any mmap read faults).

    Returns:
        {tensor name: {"dtype", "shape", "data_offsets"}} (the "__metadata__" entry removed).

    Raises:
        CheckpointError: unreadable, truncated or malformed file.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(HEADER_LEN_BYTES)
            if len(raw_len) < HEADER_LEN_BYTES:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > size - HEADER_LEN_BYTES:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header length {header_len} exceeds file size {size})")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    data_len = size - HEADER_LEN_BYTES - header_len
    spans = []
    for name, info in header.items():
        start, end = _checked_entry(path, name, info)
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor '{name}' needs bytes up to {end} but the file "
                                  f"holds {data_len} data bytes")
        spans.append((start, end, name))
    spans.sort()
    for (_, prev_end, prev), (start, end, name) in zip(spans, spans[1:]):
        if start < prev_end and end > start:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors '{prev}' and '{name}' overlap")
    # the safetensors format indexes its whole data section: no hole between tensors, none after them
    covered = 0
    for start, end, name in spans:
        if start != covered:
            raise CheckpointError(f"{path}: corrupt safetensors header: a gap of {start - covered} bytes before "
                                  f"tensor '{name}' (the data must be contiguous)")
        covered = end
    if covered != data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_len - covered} bytes after the last tensor's data")
    return header


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _checked_entry(path: str, name: str, info: Any) -> tuple[int, int]:
    """(start, end) of one header entry after checking its dtype, shape and offsets."""
    bad = f"{path}: corrupt safetensors header entry for tensor '{name}'"
    if not isinstance(info, dict):
        raise CheckpointError(bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_OF_CODE:
        raise CheckpointError(f"{bad}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{bad}: data_offsets {offsets!r} are not two increasing non-negative integers")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * DTYPE_OF_CODE[dtype].itemsize:
        raise CheckpointError(f"{bad}: data_offsets span {offsets[1] - offsets[0]} bytes, shape {shape} of "
                              f"{dtype} needs {numel * DTYPE_OF_CODE[dtype].itemsize}")
    return offsets[0], offsets[1]


def is_plain_file_name(name: Any) -> bool:
    """Whether `name` names an entry directly inside a directory (what an index or manifest may name)."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and os.sep not in name
            and "\0" not in name and not os.path.isabs(name))


def read_json_file(path: str, missing: str = "missing") -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line CheckpointError naming it."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise CheckpointError(f"{path}: names {key!r} twice")
            seen[key] = value
        return seen

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=no_duplicates)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


class CheckpointReader:
    """Tensors of an HF checkpoint directory, looked up through its index.

    Args:
        path: the checkpoint directory (with `model.safetensors.index.json`, or a single
            `model.safetensors`).

    Raises:
        CheckpointError: the directory, index or a shard is missing or invalid.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.weight_map = self._read_weight_map()
        self._headers: dict[str, dict[str, Any]] = {}
        self._handles: dict[str, Any] = {}

    # ------------------------------------------------------------------ index
    def _read_weight_map(self) -> dict[str, str]:
        index_path = os.path.join(self.path, INDEX_FILE)
        if not os.path.exists(index_path):
            single = os.path.join(self.path, SINGLE_FILE)
            if os.path.exists(single):
                return {name: SINGLE_FILE for name in read_safetensors_header(single)}
            raise CheckpointError(f"{index_path}: missing (no index and no {SINGLE_FILE})")
        index = read_json_file(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        return self._checked_weight_map(weight_map, index_path)

    def _checked_weight_map(self, weight_map: dict[str, str], listed_in: str) -> dict[str, str]:
        """`weight_map` after checking that every file it names is a file inside the directory.

        Args:
            weight_map: tensor name → file name.
            listed_in: path of the JSON file the map came from (for error messages).
        """
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not self._inside(fname):
                raise CheckpointError(f"{listed_in}: tensor '{name}' maps to {fname!r}, which is outside "
                                      f"the checkpoint directory")
            if not os.path.isfile(os.path.join(self.path, fname)):
                raise CheckpointError(f"{os.path.join(self.path, fname)}: shard missing (named by "
                                      f"{os.path.basename(listed_in)} for tensor '{name}')")
        return dict(weight_map)

    def _inside(self, fname: str) -> bool:
        """A file name the checkpoint may use: a plain name in its directory (no separators, no `..`).
        The entry itself may be a link to a regular file elsewhere, as in a HuggingFace cache
        snapshot (`shard -> ../../blobs/<sha>`): it is read like the file it points to."""
        return is_plain_file_name(fname)

    # ------------------------------------------------------------------ shards
    @property
    def files(self) -> list[str]:
        """Shard file names, sorted."""
        return sorted(set(self.weight_map.values()))

    def header(self, fname: str) -> dict[str, Any]:
        """The validated header of one shard (cached)."""
        if fname not in self._headers:
            self._headers[fname] = read_safetensors_header(os.path.join(self.path, fname))
        return self._headers[fname]

    def _entry(self, name: str) -> tuple[str, dict[str, Any]]:
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: tensor '{name}' is not in the checkpoint index")
        info = self.header(fname).get(name)
        if info is None:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: does not contain tensor '{name}' "
                                  f"(the index says it does)")
        return fname, info

    def _handle(self, fname: str):
        if fname not in self._handles:
            self.header(fname)
            try:
                self._handles[fname] = safe_open(os.path.join(self.path, fname), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot open ({e})") from None
        return self._handles[fname]

    # ------------------------------------------------------------------ tensors
    def names(self) -> list[str]:
        """All tensor names in the index, in index order."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the shard header (no data read)."""
        return tuple(int(d) for d in self._entry(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """torch dtype from the shard header (no data read)."""
        code = self._entry(name)[1]["dtype"]
        return DTYPE_OF_CODE[code]

    def nbytes(self, name: str) -> int:
        """Bytes of tensor data on disk."""
        start, end = self._entry(name)[1]["data_offsets"]
        return end - start

    def file_of(self, name: str) -> str:
        """The shard file name holding `name`."""
        return self._entry(name)[0]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor (memory-mapped read, then an owned CPU tensor)."""
        fname, _ = self._entry(name)
        try:
            return self._handle(fname).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{os.path.join(self.path, fname)}: cannot read tensor '{name}' ({e})") from None

    def get_slice(self, name: str):
        """A lazy safetensors slice of `name` (index it to read part of the tensor)."""
        fname, _ = self._entry(name)
        return self._handle(fname).get_slice(name)

    def config(self) -> dict[str, Any]:
        """The parsed config.json of the checkpoint."""
        return read_json_file(os.path.join(self.path, CONFIG_FILE))

    def close(self) -> None:
        """Drop the open shard handles."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
