"""Shared tiny checkpoints for the model tests (built once per session, deterministic)."""

import pytest

from deepseek_model.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_bf16"), "tiny", fp8=False, seed=1)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_fp8"), "tiny", fp8=True, seed=2)


@pytest.fixture(scope="session")
def tiny_v2(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_v2"), "tiny-v2", fp8=False, seed=3)
