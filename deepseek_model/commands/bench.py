"""bench: run one of the benchmarks (kernels, model, convert, train, mini, rl, gpu) with its own arguments."""

from __future__ import annotations

import argparse
import importlib

HELP = ("run a benchmark: kernels | model | convert | train | mini | rl | gpu (arguments after the name go to "
        "the benchmark)")
# benchmark name → module under deepseek_model.benchmarks
BENCHMARKS = {"kernels": "bench_kernels", "model": "bench_model", "convert": "bench_convert", "train": "bench_train",
              "mini": "bench_mini", "rl": "bench_rl", "gpu": "gpu_check"}
EXAMPLES = (
    'deepseek-model bench mini --only speculative',
    'deepseek-model bench model --quick',
    'deepseek-model bench kernels --json k.json',
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `bench`: the benchmark name, then its own arguments."""
    p.add_argument("name", choices=tuple(BENCHMARKS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (see NAME --help)")


def run(args: argparse.Namespace) -> int:
    """Import the benchmark's module and call its main(argv)."""
    try:
        module = importlib.import_module(f"deepseek_model.benchmarks.{BENCHMARKS[args.name]}")
    except ModuleNotFoundError as e:
        raise ValueError(f"benchmark '{args.name}' is not available in this install ({e.name})") from None
    return int(module.main(args.args) or 0)
