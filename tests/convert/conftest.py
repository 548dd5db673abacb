"""The converter tests' checkpoints: repository copies of the shared tiny ones, and a block-aligned FP8 one."""

from __future__ import annotations

import shutil

import pytest
from convert_helpers import add_extra_files, aligned_config

from deepseek_model.testing import make_tiny_checkpoint


def _as_repository(src: str, dst) -> str:
    """A copy of a shared tiny checkpoint with the other files a real repository ships."""
    shutil.copytree(src, dst)
    return add_extra_files(str(dst))


@pytest.fixture(scope="session")
def tiny_fp8(tiny_fp8, tmp_path_factory) -> str:  # the shared checkpoint, as a repository copy
    return _as_repository(tiny_fp8, tmp_path_factory.mktemp("ckpt") / "tiny-fp8")


@pytest.fixture(scope="session")
def tiny_bf16(tiny_bf16, tmp_path_factory) -> str:
    return _as_repository(tiny_bf16, tmp_path_factory.mktemp("ckpt") / "tiny-bf16")


@pytest.fixture(scope="session")
def aligned_fp8(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "aligned-fp8", config=aligned_config(), fp8=True,
                                seed=2)
