"""FP8 training emulation: fine-grained fake quantization of every Linear GEMM, in torch.

DeepSeek-V3 trains its GEMMs in FP8 e4m3 with fine-grained scales (report §3.3): activations per
1×128 tile (one scale per token per 128 channels), weights per 128×128 block, and the output
gradients of the backward per 1×128 tile; accumulation is promoted to fp32. This module emulates
that on any device: operands are rounded onto the fp8 grid with their scales (quantize, then
dequantize) and multiplied in fp32, so the numerics of the fp8 operands are reproduced exactly
while the arithmetic stays in torch. Master weights stay fp32 (they are the module's parameters).

The gradient is straight-through for the quantizers: with X̂, Ŵ the fake-quantized operands of the
forward (Y = X̂·Ŵᵀ) and Ĝ the fake-quantized output gradient (1×128 tiles along the output
channels), dX = Ĝ·Ŵ and dW = Ĝᵀ·X̂.

Differences from the report's kernels, by design of an emulation: products are accumulated in full
fp32 (the report promotes the tensor cores' limited-precision partial sums to fp32 every 128
elements, so its accumulation error is slightly larger), and the weight gradient reuses the forward's
1×128-tiled X̂ (the report re-tiles activations 128×1 for that GEMM).

Enabled per model by `LinearSpec(fp8_training=True)`; there is no global switch.
"""

from __future__ import annotations

import torch

from deepseek_model.kernels import ops, reference

BLOCK = reference.BLOCK


def fake_quant_act(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None) -> torch.Tensor:
    """Round x onto its fp8 e4m3 grid per 1×block tile (per row, per `block_size` columns).

    Args:
        x: [..., K] float tensor.
        block_size: columns sharing one scale.
        scale_fmt: None or "ue8m0".

    Returns:
        fp32 tensor of x's shape: dequantized act_quant(x).
    """
    *lead, k = x.shape
    q, s = ops.act_quant(x, block_size, scale_fmt)  # (..., K) fp8, (..., KB) fp32
    scale = s.repeat_interleave(block_size, dim=-1)[..., :k]  # (..., K)
    return q.float() * scale


def fake_quant_weight(w: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None) -> torch.Tensor:
    """Round a 2-D weight onto its fp8 e4m3 grid per block×block block (the checkpoint formula).

    Args:
        w: [N, K] float tensor.
        block_size: block edge.
        scale_fmt: None or "ue8m0".

    Returns:
        fp32 [N, K]: weight_dequant(weight_quant(w)).
    """
    q, s = ops.weight_quant(w, block_size, scale_fmt)  # (N, K) fp8, (NB, KB) fp32
    return ops.weight_dequant(q, s, block_size, torch.float32)


class FP8LinearFunction(torch.autograd.Function):
    """y = fake_quant_act(x)·fake_quant_weight(w)ᵀ; backward quantizes dy per 1×128 (see module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, block_size: int, scale_fmt: str | None) -> torch.Tensor:
        *lead, k = x.shape
        x_hat = fake_quant_act(x.reshape(-1, k), block_size, scale_fmt)  # (M, K) fp32
        w_hat = fake_quant_weight(weight, block_size, scale_fmt)  # (N, K) fp32
        y = x_hat @ w_hat.t()  # (M, N) fp32 accumulation
        ctx.save_for_backward(x_hat, w_hat)
        ctx.block_size, ctx.scale_fmt = block_size, scale_fmt
        ctx.x_dtype, ctx.w_dtype, ctx.lead = x.dtype, weight.dtype, lead
        return y.to(x.dtype).reshape(*lead, weight.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_hat, w_hat = ctx.saved_tensors
        n = w_hat.shape[0]
        g_hat = fake_quant_act(grad_out.reshape(-1, n), ctx.block_size, ctx.scale_fmt)  # (M, N) fp32
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_hat @ w_hat).to(ctx.x_dtype).reshape(*ctx.lead, w_hat.shape[1])  # (..., K)
        if ctx.needs_input_grad[1]:
            grad_w = (g_hat.t() @ x_hat).to(ctx.w_dtype)  # (N, K)
        return grad_x, grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, block_size: int = BLOCK,
               scale_fmt: str | None = None) -> torch.Tensor:
    """FP8-emulated y = x·Wᵀ with straight-through gradients.

    Args:
        x: [..., K] activations (any float dtype; returned in that dtype).
        weight: [N, K] master weight (fp32 or bf16, not fp8).
        block_size: tile/block edge (128).
        scale_fmt: None or "ue8m0" scales.

    Returns:
        [..., N] in x.dtype.
    """
    if weight.dtype == ops.FP8_DTYPE:
        raise ValueError("weight: fp8 training emulation needs a dense master weight, got float8_e4m3fn")
    return FP8LinearFunction.apply(x, weight, block_size, scale_fmt)
