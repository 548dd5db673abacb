"""inspect: architecture, parameter counts, formats, memory and cache size of a checkpoint or config."""

from __future__ import annotations

import argparse
import json
import os

from deepseek_model.config import BUILTIN_CONFIGS, ModelConfig
from deepseek_model.summary import model_summary

HELP = "describe a checkpoint directory (or a built-in config): parameters, FP8 coverage, memory, cache"
GIB = 1024 ** 3
MIB = 1024 ** 2
EXAMPLES = (
    'deepseek-model inspect deepseek-v3',
    'deepseek-model inspect mini-shakespeare --json',
    'deepseek-model inspect /path/to/DeepSeek-V3 --world-size 8 16',
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `inspect`."""
    p.add_argument("ckpt", help=f"checkpoint directory, or a built-in config name ({', '.join(BUILTIN_CONFIGS)})")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--world-size", type=int, nargs="+", default=[], metavar="N",
                   help="tensor/expert-parallel world size(s): weight memory per rank and whether the model "
                        "splits over N ranks (bf16 and FP8)")


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def run(args: argparse.Namespace) -> int:
    """Print the summary (text or JSON)."""
    sharded = None  # a `convert shard` output: (world size, manifest path)
    if os.path.isdir(args.ckpt):
        from deepseek_model.checkpoint.reader import CONFIG_FILE, CheckpointReader  # noqa: PLC0415 (torch)
        from deepseek_model.checkpoint.sharded import MANIFEST_FILE, is_sharded_dir, read_manifest  # noqa: PLC0415

        if is_sharded_dir(args.ckpt):  # described from its manifest's config (its files are per-rank parts)
            manifest = read_manifest(args.ckpt)
            reader, sharded = None, (manifest["world_size"], os.path.join(args.ckpt, MANIFEST_FILE))
            cfg = ModelConfig.from_dict(manifest["config"], source=sharded[1])
        else:
            reader = CheckpointReader(args.ckpt)
            cfg = ModelConfig.from_dict(reader.config(), source=os.path.join(reader.path, CONFIG_FILE))
    elif args.ckpt in BUILTIN_CONFIGS:
        reader, cfg = None, ModelConfig.builtin(args.ckpt)
    else:
        raise ValueError(f"{args.ckpt}: not a checkpoint directory or a built-in config name")
    bad = [n for n in args.world_size if n < 1]
    if bad:
        raise ValueError(f"--world-size must be >= 1, got {bad[0]}")
    s = model_summary(cfg, reader, tuple(args.world_size))
    if sharded is not None:
        s["sharded"] = {"world_size": sharded[0], "manifest": sharded[1]}
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    a, p, mem, cache = s["architecture"], s["parameters"], s["memory_bytes"], s["cache_bytes_per_token"]
    print(f"{args.ckpt}")
    print(f"  layers {a['layers']} ({a['dense_layers']} dense), hidden {a['hidden_size']}, heads {a['heads']}, "
          f"q_lora {a['q_lora_rank']}, kv_lora {a['kv_lora_rank']} + rope {a['rope']}")
    print(f"  experts {a['routed_experts']} routed + {a['shared_experts']} shared, {a['experts_per_token']} per token, "
          f"routing {a['routing']}, vocab {a['vocab']}, MTP layers {a['mtp_layers']}, YaRN factor {a['yarn_factor']}")
    print(f"  parameters: total {_human(p['total'])}, active per token {_human(p['active'])}, "
          f"MTP {_human(p['mtp'])}")
    print(f"  weights: bf16 {mem['bf16'] / GIB:.2f} GiB, fp8 {mem['fp8'] / GIB:.2f} GiB")
    ratio = cache["per_head_kv"] / cache["latent"]
    print(f"  KV cache per token (bf16, all layers): latent {cache['latent']} B vs per-head K/V "
          f"{cache['per_head_kv']} B ({ratio:.1f}x smaller)")
    if a["sparse_attention"]:
        sa = a["sparse_attention"]
        print(f"  sparse attention (DeepSeek-V3.2): indexer {sa['index_heads']} heads x {sa['index_head_dim']}, "
              f"top {sa['index_topk']} tokens per query; {_human(p['indexer'])} indexer parameters; index keys "
              f"{cache['index_keys']} B per token (bf16) or {cache['index_keys_fp8']} B (fp8 + scale)")
    if sharded is not None:
        print(f"  tensor-parallel checkpoint split over {sharded[0]} ranks (files per rank; `deepseek-model convert "
              f"merge` gives the HF layout)")
    if "checkpoint" in s:
        c = s["checkpoint"]
        dtypes = ", ".join(f"{k} {v['tensors']} tensors / {v['bytes'] / 1e6:.1f} MB" for k, v in c["dtypes"].items())
        print(f"  checkpoint: {c['files']} shards; {dtypes}")
        print(f"  fp8 coverage: {c['fp8_weights']}/{c['fp8_eligible']} eligible weights; "
              f"MTP present: {c['mtp_present']}")
    for par in s.get("parallel", []):
        _print_parallel(par)
    if s.get("parallel"):
        print("  (bf16: weights dequantized at load, from an FP8 checkpoint too: a rank reads the scale blocks covering "
              "its slice, so a split may cut a 128-block; fp8/w8a8 keep the blocks, so a split must not cut one)")
    return 0


def _print_parallel(par: dict) -> None:
    """One world size: weight memory per rank in bf16 / FP8 and why a split is refused."""
    print(f"  world size {par['world_size']} (tensor + expert parallel), weights per rank:")
    for fmt in ("bf16", "fp8"):
        b = par[fmt]
        verdict = "ok" if par["valid"][fmt] else "REFUSED: " + "; ".join(par["problems"][fmt])
        print(f"    {fmt}: {_size(b['total'])} (split {_size(b['split'])}, experts {_size(b['experts'])}, "
              f"replicated {_size(b['replicated'])}) - {verdict}")


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.2f} MiB"
