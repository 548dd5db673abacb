"""The checkpoint error type (kept free of heavy imports: the CLI catches it before torch loads)."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as described; the message names the culprit."""
