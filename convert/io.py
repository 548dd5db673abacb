"""Safe output directories: path checks, a temporary sibling renamed into place, file copies.

Every converter writes into `.<DST name>.tmp-<pid>` next to DST and renames it to DST only once all
files are written, fsynced and checked. A run killed at any point leaves at most that temporary
directory behind; the next run removes it (its pid is no longer alive) and starts clean. SRC is only
ever opened read-only.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from typing import Any, Callable, Iterable

TMP_TAG = ".tmp-"
OLD_TAG = ".old-"
AT_FDCWD = -100  # renameat2: paths relative to the working directory
RENAME_EXCHANGE = 2  # renameat2 flag: swap the two names atomically


class ConvertError(ValueError):
    """Bad input or arguments for a conversion; the one-line message names the file or tensor."""


def _holds_working_dir(path: str) -> bool:
    """Whether the absolute `path` is the working directory or a directory above it."""
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(path)
    return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def check_new_dir(path: str | os.PathLike, what: str) -> str:
    """Where a command may create an output directory: a path that does not exist yet or names an
    empty directory. The path is judged as it resolves (`a/..` is the working directory), never as
    the string reads; the working directory and the directories above it are refused.

    Args:
        path: the directory as the user gave it.
        what: how the user gave it, for the message (e.g. "OUT", "--out").

    Returns:
        The absolute path.

    Raises:
        ValueError: one line naming `what` and `path`.
    """
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{what}: an empty path names no directory")
    dst = os.path.abspath(path)
    if _holds_working_dir(dst):
        raise ValueError(f"{what} {path}: is the working directory or contains it (name a new directory)")
    if os.path.lexists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ValueError(f"{what} {path}: exists and is not an empty directory")
    return dst


def check_new_file(path: str | os.PathLike, what: str) -> str:
    """Where a command may write an output file: a non-empty path, not a directory, in a directory
    that exists. Returns the absolute path; raises ValueError naming `what` and `path`."""
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{what}: an empty path names no file")
    dst = os.path.abspath(path)
    if os.path.isdir(dst):
        raise ValueError(f"{what} {path}: is a directory")
    if not os.path.isdir(os.path.dirname(dst)):
        raise ValueError(f"{what} {path}: its directory {os.path.dirname(dst)} does not exist")
    return dst


def check_paths(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool) -> tuple[str, str]:
    """Validate SRC and DST of a conversion.

    Args:
        src: an existing checkpoint directory.
        dst: the output directory; must not be SRC, inside SRC, or contain SRC; an existing
            non-empty DST needs `overwrite`.
        overwrite: allow replacing an existing DST.

    Returns:
        (absolute src, absolute dst).

    Raises:
        ConvertError: the paths are unusable.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    for given, name in ((src, "source"), (dst, "destination")):
        if not given.strip():
            raise ConvertError(f"an empty {name} path names no directory")
    src_abs, dst_abs = os.path.abspath(src), os.path.abspath(dst)
    if _holds_working_dir(dst_abs):
        raise ConvertError(f"{dst}: destination is the working directory or contains it (name a new directory)")
    restore_orphaned(dst_abs)
    if not os.path.isdir(src_abs):
        raise ConvertError(f"{src}: source is not a directory")
    src_real, dst_real = os.path.realpath(src_abs), os.path.realpath(dst_abs)
    if dst_real == src_real:
        raise ConvertError(f"{dst}: destination is the source directory")
    if dst_real.startswith(src_real + os.sep):
        raise ConvertError(f"{dst}: destination is inside the source directory {src}")
    if src_real.startswith(dst_real + os.sep):
        raise ConvertError(f"{dst}: destination contains the source directory {src}")
    linked = _linked_into(src_abs, dst_real)
    if linked is not None:
        raise ConvertError(f"{dst}: destination holds the data of source file {linked} (it links to "
                           f"{os.path.realpath(linked)}); replacing it would delete the source")
    if os.path.lexists(dst_abs):
        if not os.path.isdir(dst_abs):
            raise ConvertError(f"{dst}: exists and is not a directory")
        if os.listdir(dst_abs) and not overwrite:
            raise ConvertError(f"{dst}: exists and is not empty (pass --overwrite to replace it)")
    return src_abs, dst_abs


def _linked_into(src: str, dst_real: str) -> str | None:
    """The first file under SRC whose real location is DST or inside it (a HuggingFace cache
    snapshot links its files into a `blobs` directory), or None."""
    for dirpath, _, files in os.walk(src):
        for name in files:
            path = os.path.join(dirpath, name)
            real = os.path.realpath(path)
            if real == dst_real or real.startswith(dst_real + os.sep):
                return path
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_siblings(dst: str) -> list[str]:
    """Leftover temporary/old directories of DST whose writing process is gone."""
    parent, base = os.path.split(os.path.abspath(dst))
    out = []
    if not os.path.isdir(parent):
        return out
    for entry in os.listdir(parent):
        for tag in (TMP_TAG, OLD_TAG):
            prefix = f".{base}{tag}"
            if entry.startswith(prefix) and entry[len(prefix):].isdigit():
                if not _pid_alive(int(entry[len(prefix):])):
                    out.append(os.path.join(parent, entry))
    return out


def restore_orphaned(dst: str) -> None:
    """A run killed between moving the old DST aside and renaming the new one in left DST missing
    and the old copy as `.DST.old-PID`: put it back (it is the only copy; it is never deleted)."""
    if os.path.lexists(dst):
        return
    for stale in stale_siblings(dst):
        if OLD_TAG in os.path.basename(stale):
            os.rename(stale, dst)
            return


def exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # kernel or file system without the flag
    raise OSError(err, os.strerror(err), b)


def fsync_dir(path: str) -> None:
    """Flush a directory entry table to disk (makes renames durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicOutputDir:
    """A temporary sibling directory that becomes DST only on `commit`.

    Use as a context manager: leaving the block without `commit` (an error) removes the temporary
    directory; DST is untouched until the final rename.

    Args:
        dst: absolute destination path (checked with `check_paths`).
    """

    def __init__(self, dst: str):
        self.dst = os.path.abspath(dst)
        parent, base = os.path.split(self.dst)
        self.tmp = os.path.join(parent, f".{base}{TMP_TAG}{os.getpid()}")
        self._old = os.path.join(parent, f".{base}{OLD_TAG}{os.getpid()}")
        self.committed = False

    def __enter__(self) -> AtomicOutputDir:
        restore_orphaned(self.dst)
        for stale in stale_siblings(self.dst):
            shutil.rmtree(stale, ignore_errors=True)
        os.makedirs(os.path.dirname(self.dst), exist_ok=True)
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.mkdir(self.tmp)
        return self

    def path(self, *parts: str) -> str:
        """A path inside the temporary directory."""
        return os.path.join(self.tmp, *parts)

    def commit(self, check: Callable[[str], None] | None = None) -> None:
        """Check the temporary directory, then rename it to DST (replacing an old DST).

        Args:
            check: called with the temporary directory; raises if the output is incomplete.
        """
        if check is not None:
            check(self.tmp)
        fsync_dir(self.tmp)
        if not os.path.lexists(self.dst):
            os.rename(self.tmp, self.dst)
            fsync_dir(os.path.dirname(self.dst))
        elif exchange(self.tmp, self.dst):  # one atomic step: DST is the new output, tmp the old one
            fsync_dir(os.path.dirname(self.dst))
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:  # no RENAME_EXCHANGE here: two renames; a kill between them leaves the old copy, which
            os.rename(self.dst, self._old)  # the next run restores (see __enter__), never deletes
            os.rename(self.tmp, self.dst)
            fsync_dir(os.path.dirname(self.dst))
            shutil.rmtree(self._old, ignore_errors=True)
        self.committed = True

    def __exit__(self, *exc: Any) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)


def copy_other_files(src: str, dst: str, skip: Iterable[str]) -> list[str]:
    """Copy every top-level entry of SRC not in `skip` (tokenizer, generation config, code, ...).

    Args:
        src: source directory.
        dst: destination directory (exists).
        skip: file names not to copy (shards, index, config.json — written by the converter).

    Returns:
        The copied names.
    """
    skip = set(skip)
    copied = []
    for entry in sorted(os.listdir(src)):
        if entry in skip:
            continue
        s, d = os.path.join(src, entry), os.path.join(dst, entry)
        if os.path.isdir(s) and not os.path.islink(s):
            _copy_tree(s, d)
        elif os.path.isfile(s):  # a regular file, or a link to one (a HuggingFace cache snapshot)
            _copy_file(s, d)
        else:
            continue  # a link to a directory (never descended: `ln -s .. loop` must not recurse), a socket...
        copied.append(entry)
    return copied


def _copy_file(src: str, dst: str) -> None:
    """The contents of `src` (links followed) as a new regular file `dst`, fsynced."""
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _copy_tree(src: str, dst: str) -> None:
    """Regular files (and links to them) below `src`, as contents; linked directories are skipped."""
    for root, dirs, files in os.walk(src):  # os.walk does not descend linked directories
        rel = os.path.relpath(root, src)
        out = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(out, exist_ok=True)
        dirs[:] = [x for x in dirs if not os.path.islink(os.path.join(root, x))]
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                _copy_file(path, os.path.join(out, name))


def write_json(path: str, obj: Any) -> None:
    """Write a JSON file (indent 2, trailing newline) and fsync it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
