"""The argument parser every command and benchmark uses: usage errors are one line."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2  # argparse's exit status for a bad command line


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr, `PROG: error: MESSAGE (see PROG
    --help)`, exit status 2, instead of the whole usage block; subparsers are of the same kind."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
