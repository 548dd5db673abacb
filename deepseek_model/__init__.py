"""deepseek-model: DeepSeek-V3-style MoE transformers in PyTorch and Triton.

The names below are imported on first use (`dsm.from_pretrained` loads torch and the model code;
`import deepseek_model` alone does not), so the command line starts fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

# public name → the module that defines it
_EXPORTS = {
    "Cache": "deepseek_model.model",
    "CheckpointError": "deepseek_model.checkpoint.errors",
    "ConfigError": "deepseek_model.config",
    "GenerationResult": "deepseek_model.generate",
    "GenerationStats": "deepseek_model.generate",
    "ModelConfig": "deepseek_model.config",
    "ParallelContext": "deepseek_model.parallel",
    "Transformer": "deepseek_model.model",
    "from_pretrained": "deepseek_model.loading",
    "pretrained_path": "deepseek_model.pretrained",
}

__all__ = sorted([*_EXPORTS, "generate", "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepseek_model' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """This package's module type: `deepseek_model.generate` is the generate() function, as it was
    when it was imported eagerly, even after the submodule of the same name has been imported (the
    import system binds a submodule onto its package; the function wins here)."""

    @property
    def generate(self):
        return importlib.import_module("deepseek_model.generate").generate

    @generate.setter
    def generate(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package
