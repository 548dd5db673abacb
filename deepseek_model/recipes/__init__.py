"""Recipes: the mini-shakespeare training run and the GRPO arithmetic run, and what they share."""

from __future__ import annotations

import os


def check_run_dir(out: str, resume: bool, state_file: str, error: type[ValueError]) -> str:
    """A recipe's output directory: new or empty (judged as the path resolves), or, with `resume`,
    one holding `state_file`. Returns its absolute path, which the run then writes to.

    Raises:
        error: one line naming --out.
    """
    from deepseek_model.convert.io import check_new_dir  # noqa: PLC0415

    if resume:
        if not out or not out.strip():
            raise error("--out: an empty path names no directory")
        if not os.path.isfile(os.path.join(out, state_file)):
            raise error(f"{out}: no {state_file} to resume from")
        return os.path.abspath(out)
    try:
        return check_new_dir(out, "--out")
    except ValueError as e:
        hint = " (pass --resume to continue a run)" if out.strip() and os.path.lexists(os.path.abspath(out)) else ""
        raise error(f"{e}{hint}") from None
