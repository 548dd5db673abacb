"""The streaming conversion driver shared by every HF → HF command.

A conversion is planned as output shards, each a list of `TensorJob`s (an output tensor and the
function that fills it from the source in row bands). The driver validates the source, writes the
shards one tensor at a time into an `AtomicOutputDir`, writes the index (with the right total_size)
and config.json, copies the other files, re-checks every written header, then renames into place.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CONFIG_FILE, INDEX_FILE, CheckpointReader
from deepseek_model.checkpoint.stream import ShardWriter, SourceReader, TensorSpec, check_written_file
from deepseek_model.config import ModelConfig
from deepseek_model.convert.io import AtomicOutputDir, ConvertError, check_paths, copy_other_files, write_json

# Seconds to sleep after each written tensor: lets tests kill a run deterministically mid-way.
CONVERT_COMPUTE_THREADS = 1  # torch threads for band math; the shard writer thread does the I/O

Advance = Callable[[int], None]


@dataclass
class TensorJob:
    """One output tensor: its spec, the function writing its bytes, the source bytes it reads.

    `fill(writer, advance)` must write all of the tensor's bytes (it may also fill other tensors of
    the same shard, e.g. a weight and its scale; those get `fill=None`) and report source bytes read
    through `advance`.
    """

    spec: TensorSpec
    fill: Callable[[ShardWriter, Advance], None] | None
    src_bytes: int = 0


def copy_job(source: SourceReader, name: str) -> TensorJob:
    """A job that copies a source tensor's bytes unchanged (copy_file_range, no user-space copy)."""
    spec = source.spec(name)

    def fill(writer: ShardWriter, advance: Advance) -> None:
        fd, offset, nbytes = source.span(name)
        writer.copy_from(name, 0, fd, offset, nbytes)
        advance(nbytes)

    return TensorJob(spec, fill, spec.nbytes)


def progress_bar(total: int, desc: str, quiet: bool) -> tqdm:
    """A tqdm bar over bytes on stderr (disabled when quiet)."""
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                disable=quiet, dynamic_ncols=True, leave=False)


def write_shards(out_dir: str, files: dict[str, list[TensorJob]], desc: str,
                 quiet: bool) -> dict[str, list[TensorSpec]]:
    """Write the planned shards into `out_dir`, one tensor at a time.

    Returns:
        {file name: tensor specs written} (files without tensors are skipped).
    """
    total = sum(j.src_bytes for jobs in files.values() for j in jobs)
    written: dict[str, list[TensorSpec]] = {}
    with progress_bar(total, desc, quiet) as bar:
        for fname, jobs in files.items():
            if not jobs:
                continue
            specs = [j.spec for j in jobs]
            writer = ShardWriter(os.path.join(out_dir, fname), specs)
            try:
                for job in jobs:
                    if job.fill is not None:
                        job.fill(writer, bar.update)
                writer.close()
            except OSError as e:  # disk full, quota...: name the file (the temporary DST goes with it)
                writer.abort()
                raise OSError(e.errno, f"{os.path.join(out_dir, fname)}: {e.strerror or e}") from None
            except BaseException:
                writer.abort()
                raise
            written[fname] = specs
    return written


def write_index(out_dir: str, written: dict[str, list[TensorSpec]]) -> int:
    """Write model.safetensors.index.json for the written shards; returns total_size."""
    weight_map = {s.name: fname for fname, specs in written.items() for s in specs}
    total = sum(s.nbytes for specs in written.values() for s in specs)
    write_json(os.path.join(out_dir, INDEX_FILE),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return total


def check_hf_output(out_dir: str, written: dict[str, list[TensorSpec]]) -> None:
    """Verify a finished HF directory: every shard header and the index agree with the plan.

    Raises:
        ValueError / CheckpointError: the output is incomplete or inconsistent.
    """
    for fname, specs in written.items():
        check_written_file(os.path.join(out_dir, fname), specs)
    reader = CheckpointReader(out_dir)
    expected = {s.name: fname for fname, specs in written.items() for s in specs}
    if reader.weight_map != expected:
        raise ValueError(f"{out_dir}: written index does not match the written shards")


PlanFn = Callable[[CheckpointReader, SourceReader], tuple[dict[str, list[TensorJob]], dict[str, Any]]]


@contextlib.contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Run torch's elementwise work on `n` threads for the duration (the previous count is restored).

    The band math is small and memory-bound; with intra-op threads it mostly waits on the other
    core, which the shard writer's I/O thread is using (3x slower measured with a busy core).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_against_config(reader: CheckpointReader, layout: schema.Schema = schema.SCHEMA) -> None:
    """Refuse a checkpoint whose config.json is invalid or contradicts its tensors (as loading would).

    Args:
        reader: the source checkpoint.
        layout: the schema the tensors are checked against (one with extra tensor families, or the default).

    Raises:
        ConfigError: config.json is invalid.
        ConvertError: a tensor is unexpected, mis-shaped or missing for that config.
    """
    source = os.path.join(reader.path, CONFIG_FILE)
    cfg = ModelConfig.from_dict(reader.config(), source=source)
    for name in reader.names():
        if not reader.dtype(name).is_floating_point:
            raise ConvertError(f"{reader.path}: tensor '{name}' is {str(reader.dtype(name)).replace('torch.', '')}; "
                               f"weights must be floating point")
    problem = layout.inventory_problem(cfg, {name: reader.shape(name) for name in reader.names()})
    if problem:
        raise ConvertError(f"{reader.path}: {problem} ({CONFIG_FILE} and the tensors disagree)")


def run_hf_conversion(src: str, dst: str, plan: PlanFn, *, overwrite: bool = False, quiet: bool = False,
                      desc: str = "convert") -> dict[str, Any]:
    """Run one HF → HF conversion safely.

    Args:
        src: source checkpoint directory (read-only).
        dst: destination directory (created atomically).
        plan: given the source reader, returns ({output shard: jobs}, new config.json dict). It
            should validate the source and raise ConvertError / CheckpointError before any write.
        overwrite: replace an existing non-empty DST.
        quiet: no progress bar.
        desc: progress bar label.

    Returns:
        A summary: {"dst", "files", "tensors", "total_size"}.
    """
    src, dst = check_paths(src, dst, overwrite)
    reader = CheckpointReader(src)
    source = SourceReader(reader)
    try:
        for fname in reader.files:  # every shard header is validated before anything is written
            reader.header(fname)
        check_against_config(reader)
        files, config = plan(reader, source)
        with AtomicOutputDir(dst) as out, compute_threads(CONVERT_COMPUTE_THREADS):
            written = write_shards(out.tmp, files, desc, quiet)
            total = write_index(out.tmp, written)
            write_json(out.path(CONFIG_FILE), config)
            copy_other_files(src, out.tmp, skip=set(reader.files) | {INDEX_FILE, CONFIG_FILE})
            out.commit(lambda tmp: check_hf_output(tmp, written))
    finally:
        source.close()
        reader.close()
    return {"dst": dst, "files": len(written), "tensors": sum(len(s) for s in written.values()),
            "total_size": total}
