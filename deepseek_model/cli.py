"""The `deepseek-model` console script: one subcommand per module in deepseek_model.commands.

Each command module exposes HELP (one line), EXAMPLES (command lines shown by --help),
add_arguments(parser) and run(args) -> exit code.
Bad input (ValueError, OSError, CheckpointError, ConfigError) prints one `error: ...` line and
exits 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from deepseek_model.commands.parser import Parser
from deepseek_model.pretrained import resolve_checkpoint

# (command, module): the module provides HELP, add_arguments(parser), run(args).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("demo", "deepseek_model.commands.demo"),
    ("make-tiny", "deepseek_model.commands.make_tiny"),
    ("inspect", "deepseek_model.commands.inspect"),
    ("convert", "deepseek_model.convert.cli"),
    ("bench", "deepseek_model.commands.bench"),
    ("train", "deepseek_model.commands.train"),
    ("generate", "deepseek_model.commands.generate"),
    ("rl", "deepseek_model.commands.rl"),
)
CHECKPOINT_ARGS = ("ckpt", "src", "a", "b")  # argument names that take a checkpoint directory
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # what a shell reports for a writer killed by SIGPIPE (`... | head`)


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The argument parser and the command → module map.

    Only the named command's module is imported when argv names one (so `convert --help` or
    `inspect CONFIG` does not pay for torch); the top-level help imports them all for their help
    lines.
    """
    parser = Parser(prog="deepseek-model",
                                     description="DeepSeek-V3-style MoE models: run, inspect, convert, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = next((a for a in (argv or []) if not a.startswith("-")), None)
    wanted = [(n, m) for n, m in COMMANDS if n == named] or list(COMMANDS)
    modules = {}
    for name, module_name in wanted:
        module = importlib.import_module(module_name)
        help_text = getattr(module, "HELP", None) or (module.__doc__ or "").strip().splitlines()[0]
        examples = getattr(module, "EXAMPLES", ())
        p = sub.add_parser(name, help=help_text, description=help_text,
                           epilog="examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        modules[name] = module
    return parser, modules


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation failure (Python's MemoryError, torch's CPU or CUDA allocator)."""
    if isinstance(e, MemoryError):
        return True
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)  # light commands never import torch
    if oom is not None and isinstance(e, oom):
        return True
    return "can't allocate memory" in str(e) or "out of memory" in str(e).lower()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, modules = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        for name in CHECKPOINT_ARGS:  # a shipped checkpoint's name stands for its directory
            if isinstance(getattr(args, name, None), str):
                setattr(args, name, resolve_checkpoint(getattr(args, name)))
        return int(modules[args.command].run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader of our output went away (`inspect --json | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
        return EXIT_BROKEN_PIPE
    except (ValueError, OSError) as e:  # CheckpointError, ConfigError and ConvertError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (MemoryError, RuntimeError) as e:  # an allocation the estimates did not foresee: one line, no traceback
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory: {_first_line(e)} (ask for less: fewer or shorter prompts, a smaller batch)",
              file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
