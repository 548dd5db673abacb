"""Shared tiny checkpoint and model for the generation tests (one thread: the box is shared)."""

import pytest
import torch

import deepseek_model as dsm
from deepseek_model.testing import make_tiny_checkpoint

TEST_THREADS = 1  # tiny matmuls: one thread is fastest and immune to oversubscription


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("gen_tiny"), "tiny", fp8=False, seed=1)


@pytest.fixture(scope="session")
def model(tiny_ckpt):
    return dsm.from_pretrained(tiny_ckpt, dtype=torch.float32)
