"""Bounded-memory tensor I/O: positional reads from source shards, a header-first shard writer.

Source tensors are read with `os.preadv` into fresh buffers rather than through a memory map: pages
touched through a map stay in the process's resident set until it is unmapped, so mmap reads of a
690 GB checkpoint would make the peak RSS grow with the model. Unchanged bytes are moved file to file
with `os.copy_file_range` (no user-space copy at all). The writer lays out a safetensors header from
the declared tensor list first and then accepts row bands at their final offsets, so no shard is ever
held in memory.
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from deepseek_model.checkpoint.reader import (DTYPE_CODES, DTYPE_OF_CODE, HEADER_LEN_BYTES, CheckpointError, CheckpointReader,
                                             read_safetensors_header)

HEADER_ALIGN = 8  # safetensors pads the JSON header with spaces to a multiple of 8 bytes
WRITES_IN_FLIGHT = 2  # band writes queued behind the one being computed (bounds the extra memory)
BAND_BYTES = 4 << 20  # target bytes of one source row band: its fp32 work buffers (16 MB) stay below
# glibc's mmap threshold, so they are reused instead of page-faulted in again for every band
COPY_CHUNK_BYTES = 256 << 20  # one copy_file_range call at most
SAFETENSORS_METADATA = {"format": "pt"}



@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one tensor of an output shard."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:
        """Length of the leading dimension (1 for a scalar)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes of one leading-dimension row."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data."""
        return math.prod(self.shape) * self.dtype.itemsize


def row_bands(rows: int, row_bytes: int, align: int = 1, band_bytes: int = BAND_BYTES) -> Iterator[tuple[int, int]]:
    """Split `rows` rows into consecutive [start, stop) bands of about `band_bytes` bytes.

    Args:
        rows: number of rows.
        row_bytes: bytes per row.
        align: every band but the last holds a multiple of `align` rows (128 keeps FP8 blocks whole).
        band_bytes: target band size.
    """
    per = max(1, band_bytes // max(1, row_bytes))
    per = max(align, per // align * align)
    for start in range(0, rows, per):
        yield start, min(rows, start + per)


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous) as a memoryview, for os.pwrite."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


class SourceReader:
    """Row-band reads of the tensors of a checkpoint directory, without memory maps.

    Args:
        reader: the validating CheckpointReader of the source directory (index and headers).
    """

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        self._fds: dict[str, tuple[int, int]] = {}  # file name → (fd, absolute offset of the data)

    def _fd(self, fname: str) -> tuple[int, int]:
        if fname not in self._fds:
            path = os.path.join(self.reader.path, fname)
            self.reader.header(fname)  # validates the file (truncation, corrupt header)
            fd = os.open(path, os.O_RDONLY)
            header_len = int.from_bytes(os.pread(fd, HEADER_LEN_BYTES, 0), "little")
            self._fds[fname] = (fd, HEADER_LEN_BYTES + header_len)
        return self._fds[fname]

    def names(self) -> list[str]:
        """All tensor names of the source index."""
        return self.reader.names()

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def spec(self, name: str) -> TensorSpec:
        """dtype and shape of a source tensor (from the shard header)."""
        return TensorSpec(name, self.reader.dtype(name), self.reader.shape(name))

    def span(self, name: str) -> tuple[int, int, int]:
        """(fd, absolute byte offset, nbytes) of a tensor's data in its shard."""
        fname = self.reader.file_of(name)
        fd, data_start = self._fd(fname)
        start, end = self.reader.header(fname)[name]["data_offsets"]
        return fd, data_start + start, end - start

    def read_rows(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of the leading dimension of `name` as an owned tensor.

        Raises:
            CheckpointError: the shard is shorter than its header says (a short read).
        """
        spec = self.spec(name)
        stop = spec.rows if stop is None else stop
        fd, offset, _ = self.span(name)
        nbytes = (stop - start) * spec.row_bytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        pos = offset + start * spec.row_bytes
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{self.reader.file_of(name)}: short read of tensor '{name}' (truncated shard)")
            done += got
        shape = ((stop - start),) + spec.shape[1:] if spec.shape else ()
        return buf.view(spec.dtype).reshape(shape)

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (use for small tensors such as scales and norms)."""
        return self.read_rows(name)

    def close(self) -> None:
        """Close the source file descriptors."""
        for fd, _ in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardWriter:
    """Writes one safetensors file whose tensors are declared up front.

    The header (offsets of every tensor) is written at construction; data then goes to its final
    place with `write_rows` or `copy_from`, in any order. `close` checks that every tensor received
    exactly its bytes.

    Args:
        path: the file to create.
        specs: the tensors, in file order.
    """

    def __init__(self, path: str, specs: list[TensorSpec]):
        self.path = path
        self.specs = {s.name: s for s in specs}
        if len(self.specs) != len(specs):
            raise ValueError(f"{path}: duplicate tensor names")
        header: dict[str, object] = {"__metadata__": SAFETENSORS_METADATA}
        self._offset: dict[str, int] = {}
        pos = 0
        for s in specs:
            header[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [pos, pos + s.nbytes]}
            self._offset[s.name] = pos
            pos += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % HEADER_ALIGN)
        self._data_start = HEADER_LEN_BYTES + len(raw)
        self.size = self._data_start + pos
        self._written = {s.name: 0 for s in specs}
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        # Band writes run on one background thread (pwrite releases the GIL) so the next band is
        # computed while this one goes to the page cache; at most WRITES_IN_FLIGHT bands wait.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: deque[Future] = deque()
        os.ftruncate(self._fd, self.size)
        os.pwrite(self._fd, len(raw).to_bytes(HEADER_LEN_BYTES, "little") + raw, 0)

    def _pos(self, name: str, start_row: int, nbytes: int) -> int:
        spec = self.specs[name]
        pos = start_row * spec.row_bytes
        if pos + nbytes > spec.nbytes:
            raise ValueError(f"{self.path}: write past the end of tensor '{name}'")
        self._written[name] += nbytes
        return self._data_start + self._offset[name] + pos

    def write_rows(self, name: str, start_row: int, rows: torch.Tensor) -> None:
        """Write a band of rows (dtype must match the declared one) starting at row `start_row`."""
        spec = self.specs[name]
        if rows.dtype != spec.dtype:
            raise ValueError(f"{self.path}: tensor '{name}' declared {spec.dtype}, got {rows.dtype}")
        data = as_bytes(rows)  # keeps the band's storage alive until the write is done
        pos = self._pos(name, start_row, len(data))
        while len(self._pending) >= WRITES_IN_FLIGHT:
            self._pending.popleft().result()  # re-raises a failed write here
        self._pending.append(self._io.submit(self._pwrite_all, data, pos))

    def _pwrite_all(self, data: memoryview, pos: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], pos + done)

    def _drain(self) -> None:
        """Wait for every queued band write (re-raising the first failure) and stop the thread."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._io.shutdown(wait=True)

    def copy_from(self, name: str, start_row: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Copy `nbytes` raw bytes from another file into tensor `name` from row `start_row`."""
        pos = self._pos(name, start_row, nbytes)
        done = 0
        while done < nbytes:
            n = min(COPY_CHUNK_BYTES, nbytes - done)
            try:
                got = os.copy_file_range(src_fd, self._fd, n, src_offset + done, pos + done)
            except OSError:  # filesystems without copy_file_range: fall back to read + write
                got = os.pwrite(self._fd, os.pread(src_fd, n, src_offset + done), pos + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: short copy into tensor '{name}' (source truncated?)")
            done += got

    def close(self, fsync: bool = True) -> None:
        """Check completeness, flush to disk and close.

        Raises:
            ValueError: a declared tensor did not receive exactly its bytes.
        """
        try:
            self._drain()
            for name, spec in self.specs.items():
                if self._written[name] != spec.nbytes:
                    raise ValueError(f"{self.path}: tensor '{name}' received {self._written[name]} of "
                                     f"{spec.nbytes} bytes")
            if fsync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)

    def abort(self) -> None:
        """Close without checks (the temporary directory is removed by the caller)."""
        try:
            self._drain()
        except OSError:
            pass  # the conversion is being abandoned anyway
        finally:
            try:
                os.close(self._fd)
            except OSError:
                pass  # already closed by a close() that failed part-way


def check_written_file(path: str, specs: list[TensorSpec]) -> None:
    """Re-read the header of a written shard and compare it with the tensors it should hold.

    Raises:
        ValueError: a tensor is missing or has another dtype/shape, or the file size is wrong.
    """
    header = read_safetensors_header(path)
    expected = {s.name: s for s in specs}
    if set(header) != set(expected):
        raise ValueError(f"{path}: written shard holds {sorted(set(header) ^ set(expected))[:3]} unexpectedly")
    end = 0
    for name, info in header.items():
        s = expected[name]
        if info["dtype"] != DTYPE_CODES[s.dtype] or tuple(info["shape"]) != s.shape:
            raise ValueError(f"{path}: tensor '{name}' written as {info['dtype']} {info['shape']}, expected "
                             f"{DTYPE_CODES[s.dtype]} {list(s.shape)}")
        end = max(end, info["data_offsets"][1])
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(HEADER_LEN_BYTES), "little")
    if os.path.getsize(path) != HEADER_LEN_BYTES + header_len + end:
        raise ValueError(f"{path}: file size does not match its header")
