"""Fixtures of the recipe tests: the shipped public-domain sample instead of the downloaded corpus."""

import os

import pytest

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "shakespeare_sample")


@pytest.fixture(scope="session")
def sample_dir() -> str:
    """Folder of *_gut.txt excerpts (Hamlet held out, two Folio duplicates)."""
    return SAMPLE_DIR
