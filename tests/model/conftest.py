"""The model tests use the shared tiny checkpoints of tests/conftest.py."""
