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
    if os.fspath(path).endswith(os.sep):
        raise ValueError(f"{what} {os.fspath(path)}: names a directory (a trailing {os.sep}), not a file")
    dst = check_new_file(path, what)
    if not _writable_dir(os.path.dirname(dst)):
        raise ValueError(f"{what} {os.fspath(path)}: its directory {os.path.dirname(dst)} is not writable")
    return Path(dst)


RESULT_FILES = ("results.json", "results.md", "results.png")  # what bench model and kernels write into --out


def check_outputs(parser: argparse.ArgumentParser, out: str | None = None, files: dict[str, str | None] | None = None,
                  out_flag: str = "--out", names: tuple[str, ...] = RESULT_FILES) -> None:
    """A benchmark's results directory (where it writes `names`) and results files, judged before
    any work: a bad one ends the command through `parser.error` (one line, exit status 2).

    Args:
        parser: the benchmark's parser.
        out: the results directory, or None (the benchmark writes none).
        files: flag -> results file (None: not asked for), e.g. {"--json": args.json}; a file
            directly inside a results directory that does not exist yet is judged once it is made.
        out_flag: the flag that gave `out`, for the message.
        names: the files the benchmark writes into `out`.
    """
    try:
        out_dir = None if out is None else check_results_dir(out, out_flag)
        for name in names if out_dir is not None else ():
            if (out_dir / name).is_dir():
                raise ValueError(f"{out_flag} {out}: {out_dir / name} is a directory, where the results file goes")
        for flag, path in (files or {}).items():
            if path is None:
                continue
            made_with_out = out_dir is not None and not out_dir.exists() and not path.endswith(os.sep) \
                and os.path.dirname(os.path.abspath(path)) == str(out_dir)
            if not made_with_out:
                check_results_file(path, flag)
    except ValueError as e:
        parser.error(str(e))


def write_run(out_dir: Path, json_file: str | None, report_text: str, table: str,
              plot: Callable[[Path], bool]) -> list[Path]:
    """A benchmark run's RESULT_FILES in out_dir (the JSON text, the markdown table, the plot) and
    the JSON again at json_file when given, together (write_results). Returns what was written."""
    json_name, md_name, png_name = RESULT_FILES
    files: list[tuple[Path, Callable[[Path], object]]] = [
        (out_dir / json_name, lambda path: path.write_text(report_text, encoding="utf-8")),
        (out_dir / md_name, lambda path: path.write_text(table, encoding="utf-8")),
        (out_dir / png_name, plot)]
    if json_file:
        files.append((Path(json_file).absolute(), lambda path: path.write_text(report_text, encoding="utf-8")))
    return write_results(files)


def write_results(files: list[tuple[Path, Callable[[Path], object]]]) -> list[Path]:
    """Write a run's files together: each writer is called with a temporary path beside its
    destination (same suffix, so a plot keeps its format), then every written file is renamed into
    place. A writer returning False wrote nothing (a plot without matplotlib) and is skipped. A
    destination named twice (a --json inside --out) is written once; a symbolic link is written
    through, not replaced.

    Args:
        files: (destination, writer) pairs; missing destination directories are created.

    Returns:
        The destinations written, in order.

    Raises:
        IsADirectoryError: a destination is a directory (before anything is written).
        OSError: from a writer or a rename; the temporary files are removed and directories this
            call created are removed again when they are left empty.
    """
    targets: dict[str, tuple[Path, Callable[[Path], object]]] = {}
    for dst, writer in files:
        real = os.path.realpath(dst)  # a link is written through
        if os.path.isdir(real):
            raise IsADirectoryError(f"{dst}: is a directory, not a results file")
        targets.setdefault(real, (Path(dst), writer))
    made: list[Path] = []
    pending: list[tuple[Path, Path, Path]] = []  # (temporary, real destination, as named)
    try:
        for i, (real, (dst, writer)) in enumerate(targets.items()):
            target = Path(real)
            missing = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
            target.parent.mkdir(parents=True, exist_ok=True)
            made.extend(reversed(missing))
            tmp = target.with_name(f".{target.stem}.partial-{os.getpid()}-{i}{target.suffix}")
            pending.append((tmp, target, dst))
            if writer(tmp) is False:
                pending.pop()
                tmp.unlink(missing_ok=True)
        for tmp, target, _ in pending:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _, _ in pending:
            tmp.unlink(missing_ok=True)
        for d in reversed(made):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    return [dst for _, _, dst in pending]
