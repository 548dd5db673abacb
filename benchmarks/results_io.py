"""Where the benchmarks write their results: every path is checked before any work starts, and the
files of one run are written whole or not at all.

A results directory may already exist (a later run replaces its results files, as a re-recorded
benchmark does); a results file may replace an older one. Each file is first written under a
temporary name beside its destination, and only when every file of the run has been written are
they renamed into place, so a failure (a full disk, a permission error) leaves the previous results
as they were and no partial new ones.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from deepseek_model.convert.io import check_new_file


def _writable_dir(path: str) -> bool:
    return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def check_results_dir(path: str | os.PathLike, what: str) -> Path:
    """A directory a benchmark may write its results into: an existing writable directory, or a path
    that can be created (no file on the way, its nearest existing ancestor a writable directory).

    Args:
        path: the directory as the user gave it.
        what: the flag that gave it, for the message (e.g. "--out").

    Returns:
        The absolute path.

    Raises:
        ValueError: one line naming `what` and `path`.
    """
    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"{what}: an empty path names no directory")
    dst = os.path.abspath(text)
    if os.path.lexists(dst):
        if not os.path.isdir(dst):
            raise ValueError(f"{what} {text}: exists and is not a directory")
        if not _writable_dir(dst):
            raise ValueError(f"{what} {text}: the directory is not writable")
        return Path(dst)
    parent = os.path.dirname(dst)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {text}: {parent} is not a directory")
    if not _writable_dir(parent):
        raise ValueError(f"{what} {text}: cannot create it, {parent} is not writable")
    return Path(dst)


def check_results_file(path: str | os.PathLike, what: str) -> Path:
    """A file a benchmark may write: not a directory, in an existing writable directory (an
    existing file is replaced). Returns the absolute path; raises ValueError naming `what`."""
    dst = check_new_file(path, what)
    if not _writable_dir(os.path.dirname(dst)):
        raise ValueError(f"{what} {os.fspath(path)}: its directory {os.path.dirname(dst)} is not writable")
    return Path(dst)


def check_outputs(parser: argparse.ArgumentParser, out: str, json_file: str | None) -> None:
    """A benchmark's --out directory and optional --json file, judged before any work: a bad one
    ends the command through `parser.error` (one line, exit status 2)."""
    try:
        check_results_dir(out, "--out")
        if json_file is not None:
            check_results_file(json_file, "--json")
    except ValueError as e:
        parser.error(str(e))


def write_results(files: list[tuple[Path, Callable[[Path], object]]]) -> list[Path]:
    """Write a run's files together: each writer is called with a temporary path beside its
    destination (same suffix, so a plot keeps its format), then every written file is renamed into
    place. A writer returning False wrote nothing (a plot without matplotlib) and is skipped.

    Args:
        files: (destination, writer) pairs; missing destination directories are created.

    Returns:
        The destinations written, in order.

    Raises:
        OSError: from a writer or a rename; the temporary files are removed and directories this
            call created are removed again when they are left empty.
    """
    made: list[Path] = []
    pending: list[tuple[Path, Path]] = []
    try:
        for dst, writer in files:
            missing = [p for p in [dst.parent, *dst.parent.parents] if not p.exists()]
            dst.parent.mkdir(parents=True, exist_ok=True)
            made.extend(reversed(missing))
            tmp = dst.with_name(f".{dst.stem}.partial-{os.getpid()}{dst.suffix}")
            pending.append((tmp, dst))
            if writer(tmp) is False:
                pending.pop()
                tmp.unlink(missing_ok=True)
        for tmp, dst in pending:
            os.replace(tmp, dst)
    except BaseException:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return [dst for _, dst in pending]
