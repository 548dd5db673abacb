"""Shared tiny checkpoint and model for the generation tests (one thread: the box is shared)."""

import pytest
import torch

import deepseek_model as dsm

TEST_THREADS = 1  # tiny matmuls: one thread is fastest and immune to oversubscription


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_bf16):
    """The shared tiny bf16 checkpoint (with its tokenizer)."""
    return tiny_bf16


@pytest.fixture(scope="session")
def model(tiny_ckpt):
    return dsm.from_pretrained(tiny_ckpt, dtype=torch.float32)
