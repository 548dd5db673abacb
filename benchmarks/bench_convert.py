"""Converter throughput and memory vs `cp` of the same bytes on the same disk, in the same run.

Builds a synthetic FP8 checkpoint in the real layout (random e4m3 bytes and scales; the conversions
do not care about values) of about --size-gb GB and one of half that size, then for each: times
`cp -r` of the source (with and without fsync, since the converter fsyncs), `fp8-to-bf16` and
`bf16-to-fp8` run as child processes, and records each child's peak RSS (os.wait4 rusage, i.e. the
RUSAGE_CHILDREN figure of that one child). Goals: throughput ≥ 0.5× cp; peak RSS ≤ 3× the largest
tensor + 300 MB and not growing with model size.

    python -m deepseek_model.benchmarks.bench_convert --size-gb 2 --json bench_convert.json
    deepseek-model bench convert --size-gb 1
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

from deepseek_model.config import ModelConfig, builtin_config_dict
from deepseek_model.checkpoint import schema
from deepseek_model.checkpoint.reader import INDEX_FILE, CheckpointReader
from deepseek_model.convert.io import write_json
from deepseek_model.checkpoint.stream import ShardWriter, TensorSpec, row_bands
from deepseek_model.benchmarks import results_io
from deepseek_model.commands.parser import Parser
from deepseek_model.constants import FP8_DTYPE, SCALE_DTYPE, block_grid

GB = 1e9
MB = 1e6
RSS_GOAL_SLACK_MB = 300
RSS_GOAL_TENSORS = 3
THROUGHPUT_GOAL = 0.5
DISK_FACTOR = 5  # peak disk use / FP8 source bytes: the source, its bf16 output and a cp of that output
SHARD_BYTES = 1 << 30  # synthetic shard size (the real repo uses ~4.3 GB)
E4M3_NAN_MASK = 0x7F  # |byte| == 0x7F is NaN in e4m3fn; such bytes are replaced
SYNTH_SEED = 0

# Synthetic model: V3-shaped blocks at a width that makes a 1–2 GB checkpoint a few layers deep.
SYNTH_DIMS = dict(hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024, num_attention_heads=16,
                  num_key_value_heads=16, q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                  v_head_dim=64, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                  vocab_size=16384, first_k_dense_replace=1)


def synthetic_config(size_gb: float) -> dict[str, Any]:
    """A V3-style config dict whose FP8 checkpoint is about `size_gb` GB (layers scale, tensors do not)."""
    d = builtin_config_dict("tiny")
    d.update(SYNTH_DIMS)
    d["num_hidden_layers"] = 2
    per_layer = _fp8_bytes(d) - _fp8_bytes({**d, "num_hidden_layers": 1})
    fixed = _fp8_bytes({**d, "num_hidden_layers": 1}) - per_layer
    d["num_hidden_layers"] = max(2, round((size_gb * GB - fixed) / per_layer))
    return d


def _fp8_bytes(d: dict[str, Any]) -> int:
    cfg = ModelConfig.from_dict(d)
    total = 0
    for name, shape in schema.hf_weight_shapes(cfg).items():
        total += math.prod(shape) * (1 if schema.is_fp8_weight(name) else 2)
    return total


def write_synthetic_fp8(path: str, config: dict[str, Any]) -> dict[str, Any]:
    """Write a synthetic FP8 checkpoint (random bytes) in the published layout, streaming.

    Returns:
        {"bytes": total tensor bytes, "largest_tensor_bytes": ..., "tensors": count}.
    """
    os.makedirs(path, exist_ok=True)
    cfg = ModelConfig.from_dict(config)
    gen = torch.Generator().manual_seed(SYNTH_SEED)
    specs: list[TensorSpec] = []
    for name, shape, fam in schema.hf_weights(cfg):
        if fam.fp8:
            specs.append(TensorSpec(name, FP8_DTYPE, shape))
            specs.append(TensorSpec(schema.scale_name(name), SCALE_DTYPE, block_grid(shape)))
        else:
            specs.append(TensorSpec(name, torch.float32 if fam.keep_fp32 else torch.bfloat16, shape))
    shards: list[list[TensorSpec]] = [[]]
    for s in specs:
        if shards[-1] and sum(x.nbytes for x in shards[-1]) + s.nbytes > SHARD_BYTES:
            shards.append([])
        shards[-1].append(s)
    weight_map = {}
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):06d}.safetensors"
        writer = ShardWriter(os.path.join(path, fname), group)
        for s in group:
            weight_map[s.name] = fname
            for start, stop in row_bands(s.rows, s.row_bytes):
                writer.write_rows(s.name, start, _random_rows(s, stop - start, gen))
        writer.close(fsync=False)
    total = sum(s.nbytes for s in specs)
    write_json(os.path.join(path, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(os.path.join(path, "config.json"), config)
    return {"bytes": total, "largest_tensor_bytes": max(s.nbytes for s in specs), "tensors": len(specs),
            "largest_tensor": max(specs, key=lambda s: s.nbytes).name}


def _random_rows(spec: TensorSpec, rows: int, gen: torch.Generator) -> torch.Tensor:
    shape = (rows,) + spec.shape[1:]
    if spec.dtype == torch.float8_e4m3fn:
        raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        raw[(raw & E4M3_NAN_MASK) == E4M3_NAN_MASK] ^= 1  # no NaN encodings
        return raw.view(torch.float8_e4m3fn)
    if spec.dtype == torch.float32 and schema.is_scale_name(spec.name):
        return torch.rand(shape, generator=gen) * 1e-3 + 1e-5
    return torch.randn(shape, generator=gen).to(spec.dtype)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def run_child(argv: list[str]) -> dict[str, float]:
    """Run a child process; wall seconds and its peak RSS (MB) from os.wait4's rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed ({proc.returncode}): {err.strip()[-300:]}")
    return {"seconds": wall, "peak_rss_mb": usage.ru_maxrss * 1024 / MB}  # ru_maxrss is KiB on Linux


def time_cp(src: str, dst: str, fsync: bool) -> float:
    """Seconds for `cp -r src dst` (then fsync of every copied file when asked, like the converter)."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", src, dst], check=True)
    if fsync:
        for root, _, files in os.walk(dst):
            for f in files:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst)
    return seconds


def bench_one(workdir: str, size_gb: float, src: str | None = None) -> dict[str, Any]:
    """Benchmark both conversions on one checkpoint (synthetic unless `src` is given)."""
    if src is None:
        src = os.path.join(workdir, f"fp8-{size_gb:g}gb")
        info = write_synthetic_fp8(src, synthetic_config(size_gb))
    else:
        reader = CheckpointReader(src)
        sizes = {n: reader.nbytes(n) for n in reader.names()}
        info = {"bytes": sum(sizes.values()), "largest_tensor_bytes": max(sizes.values()), "tensors": len(sizes),
                "largest_tensor": max(sizes, key=sizes.get)}
    cli = [sys.executable, "-m", "deepseek_model.convert.cli"]
    bf16, back = os.path.join(workdir, "bf16"), os.path.join(workdir, "fp8-again")
    fp8_bytes = _dir_bytes(src)
    row: dict[str, Any] = {"size_gb_requested": size_gb, "source": info, "src_dir_bytes": fp8_bytes}
    row["cp_fp8_s"] = time_cp(src, os.path.join(workdir, "cp"), fsync=True)
    row["cp_fp8_nofsync_s"] = time_cp(src, os.path.join(workdir, "cp"), fsync=False)
    row["fp8_to_bf16"] = run_child(cli + ["fp8-to-bf16", src, bf16, "-q"])
    bf16_bytes = _dir_bytes(bf16)
    row["bf16_dir_bytes"] = bf16_bytes
    row["cp_bf16_s"] = time_cp(bf16, os.path.join(workdir, "cp"), fsync=True)
    row["cp_bf16_nofsync_s"] = time_cp(bf16, os.path.join(workdir, "cp"), fsync=False)
    row["bf16_to_fp8"] = run_child(cli + ["bf16-to-fp8", bf16, back, "-q"])
    for key, nbytes, cp_s, cp_nofsync_s in (("fp8_to_bf16", fp8_bytes, row["cp_fp8_s"], row["cp_fp8_nofsync_s"]),
                                            ("bf16_to_fp8", bf16_bytes, row["cp_bf16_s"], row["cp_bf16_nofsync_s"])):
        r = row[key]
        r["cp_nofsync_gb_per_s"] = nbytes / cp_nofsync_s / GB
        r["src_gb_per_s"] = nbytes / r["seconds"] / GB
        r["cp_gb_per_s"] = nbytes / cp_s / GB
        r["ratio_vs_cp"] = r["src_gb_per_s"] / r["cp_gb_per_s"]
        r["rss_goal_mb"] = RSS_GOAL_TENSORS * info["largest_tensor_bytes"] / MB + RSS_GOAL_SLACK_MB
        r["rss_ok"] = r["peak_rss_mb"] <= r["rss_goal_mb"]
    for d in (bf16, back):
        shutil.rmtree(d, ignore_errors=True)
    return row


def markdown(result: dict[str, Any]) -> str:
    """A markdown table of the results."""
    lines = ["| size (GB) | largest tensor (MB) | conversion | s | src GB/s | cp GB/s (fsync) | ratio vs cp | "
             "cp GB/s (no fsync) | peak RSS (MB) | RSS goal (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["runs"]:
        for key in ("fp8_to_bf16", "bf16_to_fp8"):
            r = row[key]
            lines.append(f"| {row['source']['bytes'] / GB:.2f} | {row['source']['largest_tensor_bytes'] / MB:.0f} | "
                         f"{key} | {r['seconds']:.2f} | {r['src_gb_per_s']:.3f} | {r['cp_gb_per_s']:.3f} | "
                         f"{r['ratio_vs_cp']:.2f} | {r['cp_nofsync_gb_per_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['rss_goal_mb']:.0f} |")
    s = result["summary"]
    lines.append("")
    lines.append(f"baseline child RSS (python + torch + converter import): {result['baseline_rss_mb']:.0f} MB; "
                 f"peak RSS growth from the small to the large model: fp8_to_bf16 {s['rss_growth_mb_fp8_to_bf16']:+.0f} MB, "
                 f"bf16_to_fp8 {s['rss_growth_mb_bf16_to_fp8']:+.0f} MB; min ratio vs cp {s['min_ratio_vs_cp']:.2f} "
                 f"(goal {THROUGHPUT_GOAL}); RSS goal met: {s['rss_ok']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the converter benchmark; prints a markdown table, writes JSON if asked."""
    p = Parser(prog="deepseek-model bench convert", description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="synthetic FP8 checkpoint size (a half-size one is "
                                                               "also run to compare peak RSS)")
    p.add_argument("--path", default=None, help="benchmark this FP8 checkpoint instead (single size)")
    p.add_argument("--tmpdir", default=None, help="where to put the data (default: the system temp dir)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--md", default=None, metavar="FILE", help="write the markdown table")
    args = p.parse_args(argv)
    if args.path is None and not (math.isfinite(args.size_gb) and args.size_gb > 0):
        p.error(f"--size-gb: expected a positive size, got {args.size_gb}")
    results_io.check_outputs(p, files={"--json": args.json, "--md": args.md})
    tmpdir = args.tmpdir or tempfile.gettempdir()
    if not os.path.isdir(tmpdir):
        p.error(f"--tmpdir {tmpdir}: not a directory")
    if args.path is not None and not os.path.isfile(os.path.join(args.path, INDEX_FILE)):
        p.error(f"--path {args.path}: not a checkpoint directory (no {INDEX_FILE})")
    need = DISK_FACTOR * (_dir_bytes(args.path) if args.path else args.size_gb * GB)
    free = shutil.disk_usage(tmpdir).free
    if need > free:
        p.error(f"needs about {need / GB:.1f} GB of disk in {tmpdir} ({DISK_FACTOR}x the FP8 checkpoint), "
                f"{free / GB:.1f} GB free")
    workdir = tempfile.mkdtemp(prefix="bench_convert_", dir=tmpdir)
    try:
        baseline = run_child([sys.executable, "-c", "import deepseek_model.convert.cli, deepseek_model.convert.fp8"])
        if args.path:
            runs = [bench_one(workdir, 0.0, src=os.path.abspath(args.path))]
        else:
            runs = []
            for size in (args.size_gb / 2, args.size_gb):
                runs.append(bench_one(workdir, size))
                shutil.rmtree(os.path.join(workdir, f"fp8-{size:g}gb"), ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = [r[k]["ratio_vs_cp"] for r in runs for k in ("fp8_to_bf16", "bf16_to_fp8")]
    summary = {
        "min_ratio_vs_cp": min(ratios), "throughput_ok": min(ratios) >= THROUGHPUT_GOAL,
        "rss_ok": all(r[k]["rss_ok"] for r in runs for k in ("fp8_to_bf16", "bf16_to_fp8")),
        "rss_growth_mb_fp8_to_bf16": runs[-1]["fp8_to_bf16"]["peak_rss_mb"] - runs[0]["fp8_to_bf16"]["peak_rss_mb"],
        "rss_growth_mb_bf16_to_fp8": runs[-1]["bf16_to_fp8"]["peak_rss_mb"] - runs[0]["bf16_to_fp8"]["peak_rss_mb"],
    }
    result = {"bench": "convert", "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "baseline_rss_mb": baseline["peak_rss_mb"], "runs": runs, "summary": summary}
    table = markdown(result)
    print(table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
