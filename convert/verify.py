"""Per-tensor error report between two checkpoints of the same model, in any converter format.

Each side may be HF bf16, HF FP8 (dequantized on the fly, band by band) or the sharded form. For
every weight: max absolute error, relative error (max abs error / max |A|), and — when either side is
FP8 — the number of 128×128 blocks whose max error exceeds the FP8 quantization bound of that block:
half the e4m3 spacing at the top of the range (256..448 has spacing 32) times the block's scale_inv,
i.e. amax/28, plus a few fp32 ulps of the block's largest value. Rounding to e4m3 never moves a
value further (smaller binades and subnormals have finer spacing), and a bf16 rounding on the way
(≤ 2⁻⁹ relative) stays far inside it. Two unquantized tensors must agree within 2⁻⁸ of max |A| (a
bf16 rounding): two unrelated checkpoints of the same shapes fail.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Union

import torch
from tqdm import tqdm

from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.checkpoint.values import all_finite
from deepseek_model.convert.fp8 import FP8_DTYPES, block_size_of, check_fp8_pairs, dequant_band
from deepseek_model.convert.mtp import MTP_COPIES
from deepseek_model.checkpoint.sharded import ShardedSource, is_sharded_dir
from deepseek_model.checkpoint.stream import SourceReader, row_bands
from deepseek_model.constants import FP8_MAX
from deepseek_model.kernels.reference import BLOCK

FP8_HALF_SPACING_AT_MAX = 16.0  # e4m3 values in [256, 448] are 32 apart; rounding error ≤ 16 units of scale_inv
# fp32 round-off in w / scale_inv (quantizing), q · scale_inv (dequantizing) and the difference: a
# few ulps of the block's largest value (FP8_MAX · scale_inv), so a value on an e4m3 rounding tie
# that fp32 nudged across it still passes (a fixed relative slack of 1e-6 of the bound did not).
FP32_ULPS_SLACK = 4 * 2.0 ** -23 * FP8_MAX
DENSE_MAX_REL = 2.0 ** -8  # default bound of non-FP8 tensors: twice bf16's half-ulp, relative to max |A|
VERIFY_BAND_BYTES = 32 << 20

Source = Union[SourceReader, ShardedSource]


def open_source(path: str) -> Source:
    """Open a checkpoint directory in HF or sharded form for band reads."""
    if is_sharded_dir(path):
        return ShardedSource(path)
    return SourceReader(CheckpointReader(path))


def _close(source: Source) -> None:
    source.close()
    if isinstance(source, SourceReader):
        source.reader.close()


def _resolve(source: Source, name: str) -> str | None:
    """The tensor that holds `name` in `source` (a deduplicated MTP copy resolves to the main one)."""
    if name in source:
        return name
    for suffix, main in MTP_COPIES:
        if name.endswith("." + suffix) and schema.layer_index(name) is not None and main in source:
            return main
    return None


def _band_f32(source: Source, name: str, start: int, stop: int, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows [start, stop) of a tensor as fp32 (dequantized if fp8) and its scale rows (or None)."""
    rows = source.read_rows(name, start, stop)
    if rows.dtype not in FP8_DTYPES:
        return rows.float(), None
    scale = source.read_rows(schema.scale_name(name), start // block, math.ceil(stop / block)).float()
    return dequant_band(rows, scale, block, torch.float32), scale


def _block_max(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block max of a [R, K] band whose first row starts a block → [ceil(R/b), ceil(K/b)]."""
    r, k = x.shape
    rb, kb = math.ceil(r / block), math.ceil(k / block)
    padded = torch.nn.functional.pad(x, (0, kb * block - k, 0, rb * block - r))  # (rb·b, kb·b)
    return padded.view(rb, block, kb, block).amax(dim=(1, 3))  # (RB, KB)


def compare_tensor(a: Source, b: Source, name: str, name_a: str, name_b: str, block: int = BLOCK) -> dict[str, Any]:
    """Error statistics of one tensor (see the module docstring)."""
    sa, sb = a.spec(name_a), b.spec(name_b)
    entry: dict[str, Any] = {"dtype_a": str(sa.dtype).removeprefix("torch."),
                             "dtype_b": str(sb.dtype).removeprefix("torch."), "shape": list(sa.shape)}
    if sa.shape != sb.shape:
        entry.update(status="shape_mismatch", shape_b=list(sb.shape))
        return entry
    fp8 = sa.dtype in FP8_DTYPES or sb.dtype in FP8_DTYPES
    max_abs = ref_max = 0.0
    sq_err = 0.0
    over = blocks = 0
    finite = True
    f32_row_bytes = math.prod(sa.shape[1:]) * 4
    for start, stop in row_bands(sa.rows, f32_row_bytes, align=block if fp8 else 1, band_bytes=VERIFY_BAND_BYTES):
        xa, scale_a = _band_f32(a, name_a, start, stop, block)
        xb, scale_b = _band_f32(b, name_b, start, stop, block)
        err = (xa - xb).abs()
        finite = finite and all_finite(err)
        if err.numel():
            max_abs = max(max_abs, float(err.max()))
            ref_max = max(ref_max, float(xa.abs().max()))
            sq_err += float(err.double().square().sum())
        if fp8 and err.dim() == 2:
            scales = [s for s in (scale_a, scale_b) if s is not None]
            bound = torch.stack(scales).amax(0) * (FP8_HALF_SPACING_AT_MAX + FP32_ULPS_SLACK)  # (RB, KB)
            block_err = _block_max(err, block)
            over += int((block_err > bound).sum())
            blocks += block_err.numel()
    numel = math.prod(sa.shape)
    rel = (max_abs / ref_max) if ref_max else (0.0 if max_abs == 0 else math.inf)
    entry.update(max_abs_err=max_abs, max_rel_err=rel,
                 rms_err=math.sqrt(sq_err / numel) if numel else 0.0, exact=max_abs == 0.0 and finite)
    if fp8:
        entry.update(fp8_blocks=blocks, fp8_blocks_over_bound=over)
    elif rel > DENSE_MAX_REL:  # two unquantized tensors: at most a bf16 rounding apart
        over = 1
    entry["status"] = "ok" if finite and not over else ("nonfinite" if not finite else "over_bound")
    return entry


def verify(path_a: str, path_b: str, *, max_rel: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Compare two checkpoints tensor by tensor.

    Args:
        path_a: reference checkpoint (relative errors are relative to its values).
        path_b: the other checkpoint.
        max_rel: optional extra threshold on each tensor's max_rel_err (finite, >= 0). Without
            it, non-FP8 tensors must agree within DENSE_MAX_REL of max |A| (a bf16 rounding) and
            FP8 ones within the e4m3 rounding bound of every block.
        progress: show a tqdm bar over tensors on stderr.

    Returns:
        {"a", "b", "tensors": {name: stats}, "summary": {...}}; summary["ok"] is True when every
        tensor is present on both sides with the same shape, finite, within the FP8 block bound and
        within max_rel if given.
    """
    if max_rel is not None and not (math.isfinite(max_rel) and max_rel >= 0):
        raise ValueError(f"--max-rel must be a finite number >= 0, got {max_rel}")
    a, b = open_source(os.path.abspath(path_a)), open_source(os.path.abspath(path_b))
    try:
        for source in (a, b):  # every float8 weight has a scale on its grid: named here, not mid-comparison
            if isinstance(source, SourceReader):
                reader = source.reader
                check_fp8_pairs(reader, block_size_of(reader.config(), f"{reader.path}/config.json"))
        weights = [n for n in a.names() if not schema.is_scale_name(n)]
        weights += [n for n in b.names() if not schema.is_scale_name(n) and n not in a]
        report: dict[str, dict[str, Any]] = {}
        for name in tqdm(weights, desc="verify", file=sys.stderr, disable=not progress, leave=False):
            name_a, name_b = _resolve(a, name), _resolve(b, name)
            if name_a is None or name_b is None:
                report[name] = {"status": "missing_in_a" if name_a is None else "missing_in_b"}
                continue
            entry = compare_tensor(a, b, name, name_a, name_b)
            if max_rel is not None and entry.get("max_rel_err", 0.0) > max_rel and entry["status"] == "ok":
                entry["status"] = "over_max_rel"
            report[name] = entry
    finally:
        _close(a)
        _close(b)
    compared = [e for e in report.values() if "max_abs_err" in e]
    worst_abs = max(report, key=lambda n: report[n].get("max_abs_err", -1.0), default=None)
    worst_rel = max(report, key=lambda n: report[n].get("max_rel_err", -1.0), default=None)
    bad = sorted(n for n, e in report.items() if e["status"] != "ok")
    summary = {
        "tensors": len(report), "compared": len(compared), "exact": sum(bool(e.get("exact")) for e in compared),
        "not_ok": len(bad), "first_not_ok": bad[:5],
        "max_abs_err": report[worst_abs].get("max_abs_err", 0.0) if worst_abs else 0.0, "max_abs_err_tensor": worst_abs,
        "max_rel_err": report[worst_rel].get("max_rel_err", 0.0) if worst_rel else 0.0, "max_rel_err_tensor": worst_rel,
        "fp8_blocks": sum(e.get("fp8_blocks", 0) for e in compared),
        "fp8_blocks_over_bound": sum(e.get("fp8_blocks_over_bound", 0) for e in compared),
        "ok": not bad,
    }
    return {"a": os.path.abspath(path_a), "b": os.path.abspath(path_b), "tensors": report, "summary": summary}


def summary_line(result: dict[str, Any]) -> str:
    """One human-readable line summarising a verify result."""
    s = result["summary"]
    verdict = "OK" if s["ok"] else f"FAIL ({s['not_ok']} tensors, e.g. {', '.join(s['first_not_ok'][:2])})"
    return (f"verify: {verdict}: {s['compared']}/{s['tensors']} tensors compared, {s['exact']} exact; "
            f"max abs err {s['max_abs_err']:.3g} ({s['max_abs_err_tensor']}), max rel err {s['max_rel_err']:.3g} "
            f"({s['max_rel_err_tensor']}); fp8 blocks over bound {s['fp8_blocks_over_bound']}/{s['fp8_blocks']}")
