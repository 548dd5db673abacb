"""The Triton backend of kernels/ops.py: one entry per op, same signatures as the torch twins.

Importing this module imports triton; on a machine without a GPU set TRITON_INTERPRET=1 first.
"""

from deepseek_model.kernels.dsa import index_logits, sparse_mla_decode
from deepseek_model.kernels.fp8_gemm import fp8_gemm
from deepseek_model.kernels.fp8_moe import fused_moe
from deepseek_model.kernels.fp8_quant import act_quant, weight_dequant
from deepseek_model.kernels.mla_decode import mla_decode

__all__ = ["act_quant", "weight_dequant", "fp8_gemm", "fused_moe", "mla_decode", "index_logits",
           "sparse_mla_decode"]
