"""Resharding for tensor + expert parallelism (`shard`) and back to the HF layout (`merge`).

The split rule of every tensor comes from the checkpoint schema (deepseek_model.checkpoint.schema),
as the official inference code runs the model: column-parallel projections are cut along dim 0,
row-parallel ones along dim 1, routed experts go whole to rank e // (n_routed_experts / N), the
rest is replicated. A block scale is split with its weight, so an FP8 split boundary must fall on
a 128-block.
Ranks are written one at a time, tensor by tensor, so memory stays bounded.
"""

from __future__ import annotations

import json
import os
from typing import Any

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, CheckpointReader
from deepseek_model.checkpoint.schema import SCHEMA, SPLIT_COLUMN, SPLIT_EXPERT, SPLIT_ROW, Schema
from deepseek_model.checkpoint.sharded import (MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, SAFETENSORS_SUFFIX,
                                               ShardedSource, part_shape, rank_file_name)
from deepseek_model.checkpoint.stream import (DTYPE_CODES, DTYPE_OF_CODE, ShardWriter, SourceReader, TensorSpec,
                                              check_written_file, row_bands)
from deepseek_model.config import ModelConfig
from deepseek_model.convert.fp8 import FP8_DTYPES, block_size_of, check_fp8_pairs
from deepseek_model.convert.io import AtomicOutputDir, ConvertError, check_paths, copy_other_files, write_json
from deepseek_model.convert.mtp import tensors_by_file
from deepseek_model.convert.pipeline import (Advance, TensorJob, check_against_config, check_hf_output, write_index,
                                             write_shards)


def plan_splits(reader: CheckpointReader, world_size: int, layout: Schema = SCHEMA) -> dict[str, dict[str, Any]]:
    """How each tensor is split for `world_size` ranks, after checking that the split is legal.

    Returns:
        {HF name: {"dtype", "shape", "split", "dim"[, "rank"]}} (the manifest's "tensors").

    Raises:
        ConvertError: world_size does not divide heads / experts / vocab, a split dimension, or
            cuts an FP8 128-block (the scale could not be split with its weight).
    """
    config = reader.config()
    source = f"{reader.path}/config.json"
    if world_size < 1:
        raise ConvertError(f"--model-parallel must be >= 1, got {world_size}")
    for field in ("num_attention_heads", "n_routed_experts", "vocab_size"):
        value = config.get(field)
        if not isinstance(value, int):
            raise ConvertError(f"{source}: missing or invalid '{field}'")
        if value % world_size:
            raise ConvertError(f"--model-parallel {world_size}: {field} ({value}) is not divisible by {world_size}")
    block = block_size_of(config, source)
    check_fp8_pairs(reader, block)
    experts_per_rank = config["n_routed_experts"] // world_size
    plan: dict[str, dict[str, Any]] = {}
    for name in reader.names():
        shape, dtype = reader.shape(name), reader.dtype(name)
        kind, dim = layout.split_rule(name)
        info: dict[str, Any] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "split": kind, "dim": dim}
        if kind == SPLIT_EXPERT:
            e = layout.expert_index(name)
            if e >= config["n_routed_experts"]:
                raise ConvertError(f"{name}: expert {e} >= n_routed_experts ({config['n_routed_experts']})")
            info["rank"] = e // experts_per_rank
        elif dim is not None and not schema.is_scale_name(name):
            if len(shape) <= dim or shape[dim] % world_size:
                raise ConvertError(f"--model-parallel {world_size}: {name} dim {dim} of shape {list(shape)} "
                                   f"is not divisible by {world_size}")
            part = shape[dim] // world_size
            if dtype in FP8_DTYPES and part % block:
                raise ConvertError(f"--model-parallel {world_size}: {name} would be split into parts of {part} "
                                   f"along dim {dim}, not a multiple of the {block}-block its scale is split by")
        plan[name] = info
    return plan


def rank_spec(name: str, info: dict[str, Any], world_size: int) -> TensorSpec:
    """The shape one rank holds of a split tensor."""
    return TensorSpec(name, DTYPE_OF_CODE[info["dtype"]], part_shape(info, world_size))


def rank_job(source: SourceReader, name: str, info: dict[str, Any], rank: int, world_size: int) -> TensorJob:
    """A job writing rank `rank`'s part of one tensor."""
    spec = rank_spec(name, info, world_size)
    full = source.spec(name)

    def fill(writer: ShardWriter, advance: Advance) -> None:
        fd, offset, nbytes = source.span(name)
        if info["split"] == SPLIT_ROW:
            lo = rank * spec.shape[1]
            for start, stop in row_bands(full.rows, full.row_bytes):
                band = source.read_rows(name, start, stop)  # (stop-start, C)
                writer.write_rows(name, start, band[:, lo: lo + spec.shape[1]])
                advance(band.numel() * band.element_size() // world_size)
            return
        if info["split"] == SPLIT_COLUMN:  # rank r's rows are one contiguous byte range
            offset += rank * spec.rows * full.row_bytes
            nbytes = spec.nbytes
        writer.copy_from(name, 0, fd, offset, nbytes)
        advance(nbytes)

    return TensorJob(spec, fill, spec.nbytes)


def shard(src: str, dst: str, world_size: int, *, overwrite: bool = False, quiet: bool = False,
          layout: Schema = SCHEMA) -> dict[str, Any]:
    """Write per-rank files for tensor + expert parallelism, plus the manifest.

    Args:
        src: HF checkpoint directory (bf16 or FP8; read-only).
        dst: output directory (created atomically).
        world_size: N, the number of model-parallel ranks.
        overwrite: replace a non-empty DST.
        quiet: no progress bar.
        layout: the checkpoint schema giving each tensor's split (the default one, or one with
            extra tensor families).

    Returns:
        The summary {"dst", "world_size", "files", "total_size"}.
    """
    src, dst = check_paths(src, dst, overwrite)
    reader = CheckpointReader(src)
    source = SourceReader(reader)
    try:
        for fname in reader.files:
            reader.header(fname)
        check_against_config(reader, layout)
        plan = plan_splits(reader, world_size, layout)
        order = [n for ns in tensors_by_file(reader).values() for n in ns]
        files = {}
        for rank in range(world_size):
            held = [n for n in order if plan[n]["split"] != SPLIT_EXPERT or plan[n]["rank"] == rank]
            files[rank_file_name(rank, world_size)] = [rank_job(source, n, plan[n], rank, world_size) for n in held]
        hf_index = _source_index(reader)
        with AtomicOutputDir(dst) as out:
            written = write_shards(out.tmp, files, f"shard x{world_size}", quiet)
            ranks = [{"rank": r, "weight_map": {s.name: fname for s in written[fname]},
                      "total_size": sum(s.nbytes for s in written[fname])}
                     for r, fname in enumerate(files)]
            manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "world_size": world_size,
                        "block_size": block_size_of(reader.config(), src), "config": reader.config(),
                        "hf_index": hf_index, "tensors": plan, "ranks": ranks}
            write_json(out.path(MANIFEST_FILE), manifest)
            write_json(out.path(CONFIG_FILE), reader.config())
            copy_other_files(src, out.tmp, skip=set(reader.files) | {INDEX_FILE, CONFIG_FILE})

            def check(tmp: str) -> None:
                for fname, specs in written.items():
                    check_written_file(os.path.join(tmp, fname), specs)
                ShardedSource(tmp).close()  # the manifest validates and agrees with the rank files

            out.commit(check)
    finally:
        source.close()
        reader.close()
    return {"dst": dst, "world_size": world_size, "files": len(written),
            "total_size": sum(r["total_size"] for r in ranks)}


def _source_index(reader: CheckpointReader) -> dict[str, Any] | None:
    """The source's index as the manifest keeps it for merge (None for a single-file source).

    Raises:
        ConvertError: a shard name merge could not write back (not a `.safetensors` name).
    """
    index_path = os.path.join(reader.path, INDEX_FILE)
    if not os.path.exists(index_path):
        return None
    for name, fname in reader.weight_map.items():
        if not fname.endswith(SAFETENSORS_SUFFIX):
            raise ConvertError(f"{index_path}: tensor '{name}' is in {fname!r}, not a {SAFETENSORS_SUFFIX} shard "
                               f"(merge could not write that name back)")
    with open(index_path, encoding="utf-8") as f:
        return json.load(f)


def merge(src: str, dst: str, *, overwrite: bool = False, quiet: bool = False,
          layout: Schema | None = None) -> dict[str, Any]:
    """Merge a sharded directory back to the HF layout (the source's shard names and split).

    Nothing is written before the manifest is validated, every rank file's tensors match the parts
    the manifest describes (dtype and shape), and the manifest's config is valid and agrees with its
    tensors.

    Args:
        src: sharded directory written by `shard` (read-only).
        dst: output HF directory (created atomically).
        overwrite: replace a non-empty DST.
        quiet: no progress bar.
        layout: the schema the shard was written with. None: the default one, where tensors of
            families it does not know (a shard written with extra families) are checked against the
            rank files only.

    Returns:
        The conversion summary.

    Raises:
        CheckpointError: bad manifest, or rank files that disagree with it.
        ConfigError: the manifest's config is invalid.
        ConvertError: the manifest's config and tensors disagree.
    """
    src, dst = check_paths(src, dst, overwrite)
    source = ShardedSource(src)
    try:
        check_manifest_against_config(source, layout)
        files = _merge_plan(source)
        manifest = source.manifest
        rank_files = {f for r in manifest["ranks"] for f in r["weight_map"].values()}
        with AtomicOutputDir(dst) as out:
            written = write_shards(out.tmp, files, "merge", quiet)
            total = write_index(out.tmp, written)
            write_json(out.path(CONFIG_FILE), manifest["config"])
            copy_other_files(src, out.tmp, skip=rank_files | set(files) | {MANIFEST_FILE, CONFIG_FILE, INDEX_FILE})
            out.commit(lambda tmp: check_hf_output(tmp, written))
    finally:
        source.close()
    return {"dst": dst, "files": len(written), "tensors": sum(len(s) for s in written.values()), "total_size": total}


def check_manifest_against_config(source: ShardedSource, layout: Schema | None = None) -> None:
    """Refuse a manifest whose config is invalid or contradicts its tensors (as `check_against_config`
    does for an HF source; the shapes are the manifest's full shapes, already matched to the rank files).

    Args:
        source: the opened sharded directory.
        layout: the schema to check against; None: the default one, skipping names it does not know.

    Raises:
        ConfigError: the manifest's "config" is invalid.
        ConvertError: a tensor is not floating point, unexpected, mis-shaped or missing for that config.
    """
    mpath = os.path.join(source.path, MANIFEST_FILE)
    cfg = ModelConfig.from_dict(source.manifest["config"], source=f"{mpath}: config")
    shapes: dict[str, tuple[int, ...]] = {}
    for name in source.names():
        spec = source.spec(name)
        if not spec.dtype.is_floating_point:
            raise ConvertError(f"{mpath}: tensor '{name}' is {str(spec.dtype).replace('torch.', '')}; "
                               f"weights must be floating point")
        shapes[name] = spec.shape
    if layout is None:
        layout = SCHEMA
        shapes = {n: s for n, s in shapes.items() if _known_to(SCHEMA, n)}
    problem = layout.inventory_problem(cfg, shapes)
    if problem:
        raise ConvertError(f"{mpath}: {problem} (its 'config' and the tensors disagree)")


def _known_to(layout: Schema, name: str) -> bool:
    """Whether a tensor (or the weight of a block scale) belongs to a family of `layout`, in any layer."""
    base = schema.weight_of_scale(name) if schema.is_scale_name(name) else name
    return layout.match(base) is not None


def _merge_plan(source: ShardedSource) -> dict[str, list[TensorJob]]:
    """{output shard: jobs} in the source's layout (hf_index), or one model.safetensors without one."""
    names = source.names()
    hf_index = source.manifest.get("hf_index")
    weight_map = hf_index["weight_map"] if hf_index is not None else {n: SINGLE_FILE for n in names}
    files: dict[str, list[TensorJob]] = {}
    for name in names:  # manifest order = source on-disk order
        files.setdefault(weight_map[name], []).append(_merge_job(source, name))
    return dict(sorted(files.items()))


def _merge_job(source: ShardedSource, name: str) -> TensorJob:
    spec = source.spec(name)

    def fill(writer: ShardWriter, advance: Advance) -> None:
        for start, stop in row_bands(spec.rows, spec.row_bytes):
            writer.write_rows(name, start, source.read_rows(name, start, stop))
            advance((stop - start) * spec.row_bytes)

    return TensorJob(spec, fill, spec.nbytes)
