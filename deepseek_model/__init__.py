"""deepseek-model: DeepSeek-V3-style MoE transformers in PyTorch and Triton."""

from deepseek_model.config import ConfigError, ModelConfig

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "__version__"]
