"""Streaming FP8 ⇄ bf16 conversion of whole checkpoints, 128-row band by band.

Dequantization is `out[n, k] = fp8[n, k] · scale_inv[n // 128, k // 128]` formed in fp32 and rounded
once to bf16 — bit-identical to `kernels.reference.weight_dequant` on the whole tensor, ragged edge
blocks included. Quantization is the published per-block formula: scale_inv = amax(block) / 448 with
ragged blocks zero-padded (ue8m0: rounded up to a power of two), q = fp8(w / scale_inv), an all-zero
block giving scale 0 and zeros — bit-identical to `reference.weight_quant`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.checkpoint.values import all_finite
from deepseek_model.convert.io import ConvertError
from deepseek_model.convert.mtp import select_tensors, tensors_by_file
from deepseek_model.convert.pipeline import Advance, TensorJob, copy_job, run_hf_conversion
from deepseek_model.checkpoint.stream import ShardWriter, SourceReader, TensorSpec, row_bands
from deepseek_model.constants import FP8_BLOCK as BLOCK
from deepseek_model.constants import FP8_DTYPE, FP8_MAX, SCALE_DTYPE, SCALE_FMTS, block_grid
from deepseek_model.kernels.reference import weight_dequant, weight_quant

BF16 = torch.bfloat16
FP8_DTYPES = (torch.float8_e4m3fn,)


def dequant_band(q: torch.Tensor, s: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = BF16) -> torch.Tensor:
    """Dequantize a band of rows whose first row starts a block.

    Args:
        q: [R, K] float8_e4m3fn rows.
        s: [ceil(R/b), ceil(K/b)] fp32 scale_inv rows of the band.
        block: b.
        dtype: output dtype.

    Returns:
        [R, K] of `dtype`, bit-identical to weight_dequant(q, s, b, dtype).
    """
    return weight_dequant(q, s, block, dtype)


def block_size_of(config: dict[str, Any], source: str) -> int:
    """The square FP8 block size of a config's quantization_config (128 without one)."""
    qc = config.get("quantization_config") or {}
    sizes = qc.get("weight_block_size", [BLOCK, BLOCK])
    if not (isinstance(sizes, list) and len(sizes) == 2 and sizes[0] == sizes[1] and int(sizes[0]) > 0):
        raise ConvertError(f"{source}: quantization_config.weight_block_size {sizes!r} unsupported "
                           f"(square blocks only)")
    return int(sizes[0])


def check_fp8_pairs(reader: CheckpointReader, block: int) -> dict[str, str]:
    """Validate every float8 weight against its scale (headers only).

    Returns:
        {fp8 weight name: scale name}.

    Raises:
        ConvertError: a float8 weight without a scale, a scale without a float8 weight, a scale of
            the wrong dtype or grid.
    """
    pairs = {}
    for name in reader.names():
        dtype = reader.dtype(name)
        if schema.is_scale_name(name):
            weight = schema.weight_of_scale(name)
            if weight not in reader or reader.dtype(weight) not in FP8_DTYPES:
                raise ConvertError(f"{name}: scale without a float8 weight '{weight}'")
            continue
        if dtype not in FP8_DTYPES:
            continue
        scale = schema.scale_name(name)
        shape = reader.shape(name)
        if scale not in reader:
            raise ConvertError(f"{name}: float8 weight without its scale '{scale}'")
        if len(shape) != 2:
            raise ConvertError(f"{name}: float8 weight of shape {list(shape)} is not 2-D")
        if not reader.dtype(scale).is_floating_point:
            raise ConvertError(f"{scale}: scale has dtype {reader.dtype(scale)}, expected float32")
        grid = block_grid(shape, block)
        if reader.shape(scale) != grid:
            raise ConvertError(f"{scale}: scale grid {list(reader.shape(scale))} does not match the "
                               f"{block}x{block} block grid {list(grid)} of weight {list(shape)}")
        pairs[name] = scale
    return pairs


def dequant_job(source: SourceReader, name: str, scale: str, block: int) -> TensorJob:
    """A job writing the bf16 dequantization of one fp8 weight, band by band."""
    spec = source.spec(name)

    def fill(writer: ShardWriter, advance: Advance) -> None:
        s = source.read(scale)  # (ceil(N/b), ceil(K/b)): tiny
        if not bool((torch.isfinite(s) & (s >= 0)).all()):
            raise ConvertError(f"{scale}: NaN, infinite or negative block scales (a corrupt checkpoint)")
        for start, stop in row_bands(spec.rows, spec.row_bytes, align=block):
            q = source.read_rows(name, start, stop)  # (stop-start, K) fp8
            band = dequant_band(q, s[start // block: math.ceil(stop / block)], block)  # (stop-start, K) bf16
            if not all_finite(band):
                raise ConvertError(f"{name}: NaN or infinite values in rows {start}..{stop - 1} (a corrupt checkpoint)")
            writer.write_rows(name, start, band)
            advance(q.numel())
        advance(s.numel() * s.element_size())

    out = TensorSpec(name, BF16, spec.shape)
    return TensorJob(out, fill, spec.nbytes + source.spec(scale).nbytes)


def fp8_to_bf16(src: str, dst: str, *, strip_mtp: bool = False, dedupe_mtp: bool = False,
                overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Dequantize an FP8 checkpoint to bf16 in the HF layout, tensor by tensor.

    Same shard names and split (scales dropped), new index, config.json without quantization_config
    and with torch_dtype bfloat16, every other file copied.

    Args:
        src: FP8 checkpoint directory (read-only).
        dst: output directory (created atomically).
        strip_mtp: drop the MTP layer.
        dedupe_mtp: drop the MTP embed/head copies equal to the main ones.
        overwrite: replace a non-empty DST.
        quiet: no progress bar.

    Returns:
        The conversion summary.
    """
    def plan(reader: CheckpointReader, source: SourceReader):
        config = reader.config()
        block = block_size_of(config, f"{reader.path}/config.json")
        pairs = check_fp8_pairs(reader, block)
        if not pairs:
            raise ConvertError(f"{reader.path}: no float8 weights to dequantize (already bf16?)")
        drop, new_config = select_tensors(reader, source, config, strip_mtp=strip_mtp, dedupe_mtp=dedupe_mtp)
        new_config.pop("quantization_config", None)
        new_config["torch_dtype"] = "bfloat16"
        if "dtype" in new_config:
            new_config["dtype"] = "bfloat16"
        files = {}
        for fname, tensor_names in tensors_by_file(reader, drop).items():
            jobs = []
            for name in tensor_names:
                if schema.is_scale_name(name):
                    continue
                jobs.append(dequant_job(source, name, pairs[name], block) if name in pairs else copy_job(source, name))
            files[fname] = jobs
        return files, new_config

    return run_hf_conversion(src, dst, plan, overwrite=overwrite, quiet=quiet, desc="fp8-to-bf16")


def quant_job(source: SourceReader, name: str, block: int, scale_fmt: str | None) -> tuple[TensorJob, TensorJob]:
    """Jobs for one bf16 weight: the fp8 weight (whose fill also writes the scale) and its scale."""
    spec = source.spec(name)
    scale = schema.scale_name(name)

    def fill(writer: ShardWriter, advance: Advance) -> None:
        for start, stop in row_bands(spec.rows, spec.row_bytes, align=block):
            w = source.read_rows(name, start, stop)  # (stop-start, K)
            if not all_finite(w):
                raise ConvertError(f"{name}: NaN or infinite values in rows {start}..{stop - 1} (a corrupt checkpoint)")
            q, s = weight_quant(w, block, scale_fmt)  # a band starts a block row: its blocks are the tensor's
            writer.write_rows(name, start, q)
            writer.write_rows(scale, start // block, s)
            advance(w.numel() * w.element_size())

    weight = TensorJob(TensorSpec(name, FP8_DTYPE, spec.shape), fill, spec.nbytes)
    return weight, TensorJob(TensorSpec(scale, SCALE_DTYPE, block_grid(spec.shape, block)), None)


def quantization_config(block: int, scale_fmt: str | None) -> dict[str, Any]:
    """The published quantization_config (V3.1 adds scale_fmt "ue8m0")."""
    qc = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [block, block]}
    if scale_fmt:
        qc["scale_fmt"] = scale_fmt
    return qc


def bf16_to_fp8(src: str, dst: str, *, scale_fmt: str | None = None, strip_mtp: bool = False,
                dedupe_mtp: bool = False, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Quantize a bf16 checkpoint to the published FP8 layout.

    Exactly the tensors `schema.is_fp8_weight` selects become float8_e4m3fn with a
    block scale [ceil(N/128), ceil(K/128)] fp32 (named by `schema.scale_name`) in the same shard; the rest is copied.

    Args:
        src: bf16 checkpoint directory (read-only).
        dst: output directory (created atomically).
        scale_fmt: None or "ue8m0" (power-of-two scales, rounded up).
        strip_mtp: drop the MTP layer.
        dedupe_mtp: drop the MTP embed/head copies equal to the main ones.
        overwrite: replace a non-empty DST.
        quiet: no progress bar.

    Returns:
        The conversion summary.
    """
    if scale_fmt not in SCALE_FMTS:
        raise ConvertError(f"--scale-fmt must be one of {[f for f in SCALE_FMTS if f]}, got {scale_fmt!r}")
    block = BLOCK

    def plan(reader: CheckpointReader, source: SourceReader):
        config = reader.config()
        targets = []
        for name in reader.names():
            dtype = reader.dtype(name)
            if dtype in FP8_DTYPES or schema.is_scale_name(name):
                raise ConvertError(f"{name}: source is already FP8 ({dtype}); convert it with fp8-to-bf16 first")
            if schema.is_fp8_weight(name):
                if not dtype.is_floating_point or len(reader.shape(name)) != 2:
                    raise ConvertError(f"{name}: expected a 2-D float weight, got {dtype} {list(reader.shape(name))}")
                targets.append(name)
        if not targets:
            raise ConvertError(f"{reader.path}: no weights of the published FP8 set found")
        drop, new_config = select_tensors(reader, source, config, strip_mtp=strip_mtp, dedupe_mtp=dedupe_mtp)
        new_config["quantization_config"] = quantization_config(block, scale_fmt)
        targets = set(targets)
        files = {}
        for fname, tensor_names in tensors_by_file(reader, drop).items():
            jobs: list[TensorJob] = []
            for name in tensor_names:
                jobs.extend(quant_job(source, name, block, scale_fmt) if name in targets else [copy_job(source, name)])
            files[fname] = jobs
        return files, new_config

    return run_hf_conversion(src, dst, plan, overwrite=overwrite, quiet=quiet, desc="bf16-to-fp8")
