"""Checks of command-line values shared by several commands (one-line errors naming the flag)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Iterator, TextIO


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """Refuse a thread count below 1 or above this machine's CPUs (None: keep torch's default)."""
    if threads is None:
        return
    cpus = os.cpu_count() or 1
    if not 1 <= threads <= cpus:
        raise ValueError(f"{flag} must be between 1 and the {cpus} CPUs of this machine, got {threads}")


MAX_SEED = 2**32 - 1  # --seed range [0, MAX_SEED]: every generator a command derives from it stays in range


def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer in [0, MAX_SEED] (the usage line names the flag)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text}")
    return seed


class Once(argparse.Action):
    """Store a flag's value, refusing the flag a second time (argparse would keep the last silently)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            raise argparse.ArgumentError(self, "given more than once (pass one value)")
        setattr(namespace, self.dest, values)


def check_finite(value: float, flag: str) -> None:
    """Refuse NaN and infinities for a float flag."""
    if not math.isfinite(value):
        raise ValueError(f"{flag} must be a finite number, got {value}")


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of a file, or of stdin for "-"; undecodable bytes are a one-line error naming the source."""
    source = "stdin" if path == "-" else path
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8-sig")  # a leading byte-order mark is not text
        with open(path, "rb") as f:
            return f.read().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {source}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None


def utf8_lines(stream: TextIO, source: str) -> Iterator[str]:
    """Lines of a text stream whose bytes may not be UTF-8 (stdin): each is decoded strictly and a bad
    one is a one-line error naming the source and the line number."""
    raw = getattr(stream, "buffer", None)
    if raw is None:  # already text
        yield from stream
        return
    for number, line in enumerate(raw, 1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading byte-order mark is not text
        except UnicodeDecodeError as e:
            raise ValueError(f"{source} line {number}: not UTF-8 text (byte 0x{line[e.start]:02x})") from None
