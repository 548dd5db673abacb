"""RL tests: one intra-op thread (the machine is shared; these models are tiny)."""

import pytest

from deepseek_model.testing import one_thread


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield
