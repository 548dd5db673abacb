"""`deepseek-model convert ...`: fp8-to-bf16, bf16-to-fp8, shard, merge, strip-mtp, verify.

The console script (deepseek_model/cli.py) builds the `convert` parser with `add_arguments` and
calls `run`; `python -m deepseek_model.convert.cli ...` runs the same commands standalone through
`main`, which turns bad input into one `error: ...` line on stderr and exit code 2.

Examples:
    python -m deepseek_model.convert.cli fp8-to-bf16 DeepSeek-V3 DeepSeek-V3-bf16
    python -m deepseek_model.convert.cli bf16-to-fp8 V3-bf16 V3-fp8 --scale-fmt ue8m0
    python -m deepseek_model.convert.cli shard V3-bf16 V3-tp8 --model-parallel 8
    python -m deepseek_model.convert.cli verify DeepSeek-V3 V3-fp8 --json report.json
"""

from __future__ import annotations

import argparse
import json
import sys

from deepseek_model.checkpoint.errors import CheckpointError
from deepseek_model.commands.parser import Parser
from deepseek_model.convert.io import ConvertError

EXAMPLES = (
    'deepseek-model convert fp8-to-bf16 SRC DST',
    'deepseek-model convert shard SRC DST --model-parallel 8',
    'deepseek-model convert verify A B --json report.json',
)
EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 1
EXIT_INTERRUPTED = 130


def _add_common(p: argparse.ArgumentParser, src_help: str, dst_help: str) -> None:
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("dst", metavar="DST", help=dst_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_mtp_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--strip-mtp", action="store_true",
                   help="drop the MTP layer (layer num_hidden_layers) and set num_nextn_predict_layers 0")
    g.add_argument("--dedupe-mtp", action="store_true",
                   help="keep MTP but drop its embed_tokens / shared_head.head when byte-identical to the main ones")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Populate the `convert` command's parser with its subcommands.

    Args:
        parser: the (sub)parser of `deepseek-model convert`.
    """
    sub = parser.add_subparsers(dest="convert_command", metavar="COMMAND", required=True)

    p = sub.add_parser("fp8-to-bf16", help="dequantize an FP8 checkpoint to bf16 (CPU, streaming)")
    _add_common(p, "FP8 checkpoint directory (read-only)", "output bf16 checkpoint directory")
    _add_mtp_options(p)

    p = sub.add_parser("bf16-to-fp8", help="quantize a bf16 checkpoint to the published FP8 layout")
    _add_common(p, "bf16 checkpoint directory (read-only)", "output FP8 checkpoint directory")
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                   help="round scales up to powers of two (DeepSeek-V3.1 format)")
    _add_mtp_options(p)

    p = sub.add_parser("shard", help="split into per-rank files for tensor + expert parallelism")
    _add_common(p, "HF checkpoint directory (bf16 or FP8, read-only)", "output sharded directory")
    p.add_argument("--model-parallel", "-n", type=int, required=True, metavar="N", help="number of ranks")

    p = sub.add_parser("merge", help="merge a sharded directory back to the HF layout")
    _add_common(p, "sharded directory written by `shard` (read-only)", "output HF checkpoint directory")

    p = sub.add_parser("strip-mtp", help="copy a checkpoint without its MTP layer")
    _add_common(p, "HF checkpoint directory (read-only)", "output checkpoint directory")

    p = sub.add_parser("verify", help="per-tensor error report (JSON) between two checkpoints of one model")
    p.add_argument("a", metavar="A", help="reference checkpoint (HF bf16/FP8 or sharded)")
    p.add_argument("b", metavar="B", help="checkpoint to compare (HF bf16/FP8 or sharded)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write the JSON report here (default: stdout; the summary line goes to stderr)")
    p.add_argument("--max-rel", type=float, default=None, help="fail tensors whose max relative error exceeds this")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `convert` command.

    Returns:
        0 on success, 1 when `verify` finds a difference beyond the bounds.

    Raises:
        ConvertError, CheckpointError (ValueError subclasses) with one-line messages on bad input.
    """
    cmd = args.convert_command
    if cmd == "verify":
        from deepseek_model.convert.verify import summary_line, verify  # noqa: PLC0415 (keeps --help fast)

        if args.json is not None:  # before the comparison, which may take hours
            from deepseek_model.convert.io import check_new_file  # noqa: PLC0415

            check_new_file(args.json, "--json")
        result = verify(args.a, args.b, max_rel=args.max_rel, progress=not args.quiet)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)
            print(summary_line(result))
        else:
            json.dump(result, sys.stdout, indent=2)
            print()
            print(summary_line(result), file=sys.stderr)
        return 0 if result["summary"]["ok"] else EXIT_VERIFY_FAILED
    common = {"overwrite": args.overwrite, "quiet": args.quiet}
    if cmd == "fp8-to-bf16":
        from deepseek_model.convert.fp8 import fp8_to_bf16  # noqa: PLC0415

        summary = fp8_to_bf16(args.src, args.dst, strip_mtp=args.strip_mtp, dedupe_mtp=args.dedupe_mtp, **common)
    elif cmd == "bf16-to-fp8":
        from deepseek_model.convert.fp8 import bf16_to_fp8  # noqa: PLC0415

        summary = bf16_to_fp8(args.src, args.dst, scale_fmt=args.scale_fmt, strip_mtp=args.strip_mtp,
                              dedupe_mtp=args.dedupe_mtp, **common)
    elif cmd == "shard":
        from deepseek_model.convert.shard import shard  # noqa: PLC0415

        summary = shard(args.src, args.dst, args.model_parallel, **common)
    elif cmd == "merge":
        from deepseek_model.convert.shard import merge  # noqa: PLC0415

        summary = merge(args.src, args.dst, **common)
    elif cmd == "strip-mtp":
        from deepseek_model.convert.mtp import strip_mtp  # noqa: PLC0415

        summary = strip_mtp(args.src, args.dst, **common)
    else:
        raise ConvertError(f"unknown convert command {cmd!r}")
    if not args.quiet:
        print(f"{cmd}: wrote {summary['dst']} ({summary['total_size'] / 2**30:.2f} GiB of tensors)", file=sys.stderr)
    return 0


def one_line(err: BaseException) -> str:
    """The first line of an exception message (errors are always reported on one line)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: parse, run, report bad input as one `error:` line (exit 2)."""
    parser = Parser(prog="deepseek-model convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ConvertError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted (no output written)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
