"""Building blocks: RMSNorm, Linear (dense or fp8 weight + block scale), parallel linears, embedding.

Every projection and the output head call `deepseek_model.kernels.ops.linear` (the router alone
computes its logits in fp32 with F.linear, as the published model does); whether a projection runs
dense or W8A8 is the weight's dtype, not a global switch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_model import fp8_training
from deepseek_model.constants import FP8_DTYPE, block_grid
from deepseek_model.kernels import cpu_pack, ops
from deepseek_model.kernels.cpu_pack import PackedWeight
from deepseek_model.parallel import SINGLE_PROCESS, ParallelContext



@dataclass(frozen=True)
class LinearSpec:
    """How the Linear layers of a model store and run their weights.

    Attributes:
        dtype: compute dtype (and weight dtype when not fp8).
        device: where parameters live.
        fp8: store weights as float8_e4m3fn with a fp32 block scale.
        w8a8: with fp8 weights, quantize activations per 1×128 too (W8A8, the DeepSeek-V3 inference
            numerics); False dequantizes the weight per GEMM into `dtype` (weight-only FP8).
        block_size: quantization block (128).
        scale_fmt: activation-scale format for W8A8 (None or "ue8m0").
        backend: kernel backend for ops ("torch" | "triton" | "auto").
        fp8_training: emulate FP8 training in the dense linears (1×128 activation tiles, 128×128
            weight blocks, 1×128 gradient tiles; see deepseek_model.fp8_training).
        batch_invariant: every row's result is bit-identical whatever rows are computed with it
            (GEMMs on fixed row tiles, attention per query over exactly its keys, no grouped ops).
    """

    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    fp8: bool = False
    w8a8: bool = True
    block_size: int = 128
    scale_fmt: str | None = None
    backend: str = "torch"
    fp8_training: bool = False
    batch_invariant: bool = False

    @property
    def row_tile(self) -> int | None:
        """The fixed GEMM row tile of batch-invariant mode (None: any shape)."""
        return ops.INVARIANT_ROWS if self.batch_invariant else None


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight multiplies after casting back to the input dtype."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Linear(nn.Module):
    """y = x·Wᵀ through ops.linear; W is dense (spec.dtype) or fp8 with a [⌈out/b⌉, ⌈in/b⌉] scale.

    Args:
        in_features: K.
        out_features: N.
        spec: storage/compute description shared by the model's linears.
        fp8: override spec.fp8 for this layer (eh_proj is never fp8).
    """

    def __init__(self, in_features: int, out_features: int, spec: LinearSpec, fp8: bool | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec
        use_fp8 = spec.fp8 if fp8 is None else fp8
        self.fake_fp8 = spec.fp8_training and fp8 is not False and not use_fp8  # layers kept high-precision opt out
        wdtype = FP8_DTYPE if use_fp8 else spec.dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype, device=spec.device),
                                   requires_grad=not use_fp8)
        if use_fp8:
            b = spec.block_size
            grid = block_grid((out_features, in_features), b)
            self.scale = nn.Parameter(torch.empty(grid, dtype=torch.float32, device=spec.device),
                                      requires_grad=False)
        else:
            self.register_parameter("scale", None)
        self.packed: PackedWeight | None = None  # a oneDNN-blocked copy of the weight, made by pack()

    @property
    def is_fp8(self) -> bool:
        """Whether the weight is stored as float8_e4m3fn."""
        return self.weight.dtype == FP8_DTYPE

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense tensor (dequantized when fp8)."""
        dtype = dtype or self.spec.dtype
        if self.is_fp8:
            return ops.weight_dequant(self.weight, self.scale, self.spec.block_size, dtype)
        return self.weight.to(dtype)

    def pack(self) -> int:
        """Make the oneDNN-blocked copy that CPU inference GEMMs then read (see kernels.cpu_pack).

        Returns:
            Bytes allocated (0 where the weight is not a float32/bfloat16 CPU weight: fp8 weights,
            batch-invariant GEMMs and emulated-FP8 training keep their own paths).
        """
        n = self.pack_nbytes()
        if n:
            self.packed = PackedWeight.of(self.weight)
        return n

    def pack_nbytes(self) -> int:
        """Bytes pack() allocates (0 where it packs nothing)."""
        if self.fake_fp8 or self.spec.row_tile is not None or not cpu_pack.packable(self.weight):
            return 0
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_fp8:
            return fp8_training.fp8_linear(x, self.weight, self.spec.block_size, self.spec.scale_fmt)
        return ops.linear(x, self.weight, self.scale, backend=self.spec.backend, block_size=self.spec.block_size,
                          scale_fmt=self.spec.scale_fmt, w8a8=self.spec.w8a8, row_tile=self.spec.row_tile,
                          packed=self.packed)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, dtype={self.weight.dtype}"


class ColumnParallelLinear(Linear):
    """Output features split across ranks; each rank returns its slice (no communication)."""

    def __init__(self, in_features: int, out_features: int, spec: LinearSpec, ctx: ParallelContext = SINGLE_PROCESS):
        super().__init__(in_features, ctx.split(out_features, "output features"), spec)


class RowParallelLinear(Linear):
    """Input features split across ranks; partial outputs are summed with an all-reduce."""

    def __init__(self, in_features: int, out_features: int, spec: LinearSpec, ctx: ParallelContext = SINGLE_PROCESS):
        super().__init__(ctx.split(in_features, "input features"), out_features, spec)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctx.all_reduce(super().forward(x))


class ParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks (rows outside a rank's range are 0)."""

    def __init__(self, vocab_size: int, dim: int, dtype: torch.dtype, device: torch.device | str,
                 ctx: ParallelContext = SINGLE_PROCESS):
        super().__init__()
        self.vocab_size, self.ctx = vocab_size, ctx
        self.part = ctx.split(vocab_size, "vocab_size")
        self.start = ctx.rank * self.part
        self.weight = nn.Parameter(torch.empty(self.part, dim, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.ctx.is_distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.part)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D)
        y = y.masked_fill(outside.unsqueeze(-1), 0)
        return self.ctx.all_reduce(y)


class ParallelHead(nn.Module):
    """Output head with the vocabulary split across ranks; logits gathered to full width (fp32)."""

    def __init__(self, dim: int, vocab_size: int, dtype: torch.dtype, device: torch.device | str,
                 ctx: ParallelContext = SINGLE_PROCESS, row_tile: int | None = None):
        super().__init__()
        self.ctx, self.row_tile = ctx, row_tile
        self.weight = nn.Parameter(torch.empty(ctx.split(vocab_size, "vocab_size"), dim, dtype=dtype, device=device))
        self.packed: PackedWeight | None = None  # a oneDNN-blocked copy of the weight, made by pack()

    def pack(self) -> int:
        """Make the oneDNN-blocked copy of the head's weight; returns the bytes allocated (see Linear.pack)."""
        n = self.pack_nbytes()
        if n:
            self.packed = PackedWeight.of(self.weight)
        return n

    def pack_nbytes(self) -> int:
        """Bytes pack() allocates (0 in batch-invariant mode or for a weight that cannot be packed)."""
        if self.row_tile is not None or not cpu_pack.packable(self.weight):
            return 0
        return self.weight.numel() * self.weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(x, self.weight, row_tile=self.row_tile, packed=self.packed).float()  # (B, T, V/world)
        return self.ctx.all_gather(logits, dim=-1)
