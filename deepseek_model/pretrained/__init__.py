"""Checkpoints shipped inside the package, found by name.

`mini-shakespeare` is a DeepSeek-V3 in miniature (MLA, DeepSeekMoE with sigmoid group-limited
routing and the correction bias, one MTP layer) trained by `deepseek-model train --recipe
mini-shakespeare` on Shakespeare's plays, stored in the published FP8 layout with its tokenizer.
Every place that takes a checkpoint directory (`from_pretrained`, `load_tokenizer`, the CLI) also
takes one of these names.
"""

from __future__ import annotations

import os
from importlib import resources

PRETRAINED = ("mini-shakespeare",)


def pretrained_path(name: str) -> str:
    """The directory of a shipped checkpoint.

    Args:
        name: one of PRETRAINED.

    Returns:
        An existing directory holding config.json, the index, the shards and the tokenizer.

    Raises:
        ValueError: an unknown name, or the files are missing from this install.
    """
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r} (shipped: {', '.join(PRETRAINED)})")
    path = os.fspath(resources.files("deepseek_model.pretrained").joinpath(name))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path}: the shipped '{name}' checkpoint is missing from this install")
    return path


def resolve_checkpoint(path_or_name: str | os.PathLike) -> str:
    """A checkpoint directory: the path itself when it exists (or is not a shipped name), else the
    shipped checkpoint of that name."""
    path = os.fspath(path_or_name)
    if path in PRETRAINED and not os.path.exists(path):
        return pretrained_path(path)
    return path
