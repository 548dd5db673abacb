"""make-tiny: write a deterministic tiny checkpoint in the published HF layout."""

from __future__ import annotations

import argparse

from deepseek_model.commands.options import seed_arg
from deepseek_model.config import BUILTIN_CONFIGS
from deepseek_model.checkpoint.writer import DEFAULT_SHARDS
from deepseek_model.testing import check_build_memory, make_tiny_checkpoint

HELP = "write a deterministic random checkpoint in the exact HF layout (bf16 or FP8, with MTP)"
EXAMPLES = (
    'deepseek-model make-tiny /tmp/tiny --fp8',
    'deepseek-model make-tiny /tmp/small --config small --seed 3',
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `make-tiny`."""
    p.add_argument("out", help="output directory (must not exist or be empty)")
    p.add_argument("--fp8", action="store_true", help="store the published FP8 tensor set with block scales")
    p.add_argument("--seed", type=seed_arg, default=0, help="RNG seed (same seed: identical bytes)")
    p.add_argument("--config", default="tiny", choices=BUILTIN_CONFIGS, help="built-in architecture")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    p.add_argument("--shards", type=int, default=DEFAULT_SHARDS, help="number of safetensors shards")


def run(args: argparse.Namespace) -> int:
    """Write the checkpoint and print where."""
    from deepseek_model.convert.io import AtomicOutputDir, check_new_dir  # noqa: PLC0415 (torch-free; keeps --help fast)

    dst = check_new_dir(args.out, "OUT")
    if args.shards < 1:
        raise ValueError(f"--shards must be >= 1, got {args.shards}")
    check_build_memory(args.config, args.fp8, not args.no_mtp, dst)  # before any file
    with AtomicOutputDir(dst) as out:  # a failure (disk full) leaves no OUT behind
        make_tiny_checkpoint(out.tmp, args.config, fp8=args.fp8, seed=args.seed, mtp=not args.no_mtp,
                             num_shards=args.shards)
        out.commit()
    print(f"wrote {'fp8' if args.fp8 else 'bf16'} '{args.config}' checkpoint to {dst}")
    return 0
