"""deepseek-model: DeepSeek-V3-style MoE transformers in PyTorch and Triton."""

from deepseek_model.config import ConfigError, ModelConfig
from deepseek_model.checkpoint.reader import CheckpointError
from deepseek_model.generate import GenerationResult, GenerationStats, generate
from deepseek_model.loading import from_pretrained
from deepseek_model.model import Cache, Transformer
from deepseek_model.parallel import ParallelContext
from deepseek_model.pretrained import pretrained_path

__version__ = "0.1.0"

__all__ = ["Cache", "CheckpointError", "ConfigError", "GenerationResult", "GenerationStats", "ModelConfig", "ParallelContext", "Transformer", "__version__",
           "from_pretrained", "generate", "pretrained_path"]
