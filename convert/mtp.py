"""The multi-token-prediction (MTP) layer of a checkpoint: find it, strip it, dedupe its copies.

The MTP module is stored as decoder layer `num_hidden_layers`, after the main stack. Its `embed_tokens` and
`shared_head.head` are byte-identical copies of the main `model.embed_tokens` / `lm_head`; a loader
that finds them missing must use the main tensors instead.
"""

from __future__ import annotations

from typing import Any

import torch

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.convert.io import ConvertError
from deepseek_model.convert.pipeline import copy_job, run_hf_conversion
from deepseek_model.checkpoint.stream import SourceReader, row_bands

# (suffix under model.layers.{L}., the main tensor it copies)
MTP_COPIES: tuple[tuple[str, str], ...] = (
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("shared_head.head.weight", "lm_head.weight"),
)


def num_hidden_layers(config: dict[str, Any], source: str = "config.json") -> int:
    """`num_hidden_layers` of an HF config dict (the MTP layer index).

    Raises:
        ConvertError: the field is missing or not an integer.
    """
    value = config.get("num_hidden_layers")
    if not isinstance(value, int) or value <= 0:
        raise ConvertError(f"{source}: missing or invalid 'num_hidden_layers'")
    return value


def is_mtp_tensor(hf_name: str, num_layers: int) -> bool:
    """Whether `hf_name` belongs to an MTP layer (layer index >= num_hidden_layers)."""
    layer = schema.layer_index(hf_name)
    return layer is not None and layer >= num_layers


def stripped_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict with `num_nextn_predict_layers` set to 0."""
    out = dict(config)
    out["num_nextn_predict_layers"] = 0
    return out


def same_bytes(source: SourceReader, a: str, b: str) -> bool:
    """Whether two source tensors have equal dtype, shape and bytes (compared in row bands)."""
    sa, sb = source.spec(a), source.spec(b)
    if sa.dtype != sb.dtype or sa.shape != sb.shape:
        return False
    for start, stop in row_bands(sa.rows, sa.row_bytes):
        if not torch.equal(source.read_rows(a, start, stop).view(torch.uint8),
                           source.read_rows(b, start, stop).view(torch.uint8)):
            return False
    return True


def duplicate_mtp_copies(reader: CheckpointReader, source: SourceReader, num_layers: int) -> set[str]:
    """MTP embed/head tensors equal byte for byte to the main embedding / lm_head."""
    dupes = set()
    for suffix, main in MTP_COPIES:
        name = f"model.layers.{num_layers}.{suffix}"
        if name in reader and main in reader and same_bytes(source, name, main):
            dupes.add(name)
    return dupes


def select_tensors(reader: CheckpointReader, source: SourceReader, config: dict[str, Any], *,
                   strip_mtp: bool = False, dedupe_mtp: bool = False) -> tuple[set[str], dict[str, Any]]:
    """The source tensor names to drop and the config to write, for the MTP options.

    Args:
        reader: the source checkpoint.
        source: row reader over it.
        config: the source config.json dict.
        strip_mtp: drop the whole MTP layer and set num_nextn_predict_layers to 0.
        dedupe_mtp: keep the MTP layer but drop its embed/head copies equal to the main ones.

    Returns:
        (names to drop, config dict).
    """
    if strip_mtp and dedupe_mtp:
        raise ConvertError("--strip-mtp and --dedupe-mtp exclude each other")
    layers = num_hidden_layers(config, f"{reader.path}/config.json")
    if strip_mtp:
        return {n for n in reader.names() if is_mtp_tensor(n, layers)}, stripped_config(config)
    if dedupe_mtp:
        return duplicate_mtp_copies(reader, source, layers), dict(config)
    return set(), dict(config)


def tensors_by_file(reader: CheckpointReader, drop: set[str] = frozenset()) -> dict[str, list[str]]:
    """{shard file: its indexed tensor names in on-disk order}, without `drop`."""
    out: dict[str, list[str]] = {}
    for fname in reader.files:
        header = reader.header(fname)
        listed = [n for n, f in reader.weight_map.items() if f == fname and n not in drop]
        out[fname] = sorted(listed, key=lambda n: header[n]["data_offsets"][0] if n in header else -1)
    return out


def strip_mtp(src: str, dst: str, *, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Copy a checkpoint without its MTP layer (tensors byte for byte, same shard names).

    Args:
        src: source checkpoint directory.
        dst: destination directory.
        overwrite: replace a non-empty DST.
        quiet: no progress bar.

    Returns:
        The conversion summary.
    """
    from deepseek_model.convert.fp8 import block_size_of, check_fp8_pairs  # noqa: PLC0415 (fp8 imports this module)

    def plan(reader: CheckpointReader, source: SourceReader):
        config = reader.config()
        drop, new_config = select_tensors(reader, source, config, strip_mtp=True)
        if not drop:
            raise ConvertError(f"{reader.path}: no MTP layer (layer {num_hidden_layers(config)}) to strip")
        for name in reader.names():  # headers must hold what the index says
            source.spec(name)
        check_fp8_pairs(reader, block_size_of(config, f"{reader.path}/config.json"))  # a copy is checked as a load is
        files = {f: [copy_job(source, n) for n in ns] for f, ns in tensors_by_file(reader, drop).items()}
        return files, new_config

    return run_hf_conversion(src, dst, plan, overwrite=overwrite, quiet=quiet, desc="strip-mtp")
