"""Shared tiny checkpoints for the converter tests (CPU, seconds; session-scoped, never modified)."""

from __future__ import annotations

import pytest
from convert_helpers import add_extra_files, aligned_config

from deepseek_model.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory) -> str:
    return add_extra_files(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp8", fp8=True))


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory) -> str:
    return add_extra_files(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bf16", fp8=False, seed=1))


@pytest.fixture(scope="session")
def aligned_fp8(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "aligned-fp8", config=aligned_config(), fp8=True,
                                seed=2)
