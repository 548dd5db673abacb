"""rl: GRPO (DeepSeek-R1-Zero in miniature) on a verifiable task, with its held-out pass@1."""

from __future__ import annotations

import argparse
import math
import os

from deepseek_model.commands.options import check_threads, seed_arg

HELP = ("reinforcement learning with GRPO: the arithmetic recipe (supervised warm-up, then rule rewards), "
        "held-out pass@1 before/after, resumable, JSON log and curves")
RECIPES = ("arithmetic",)
RECIPE_OUT = "arithmetic-rl-run"
CONTROL_CHOICES = ("shuffled",)
EXAMPLES = (
    "deepseek-model rl --recipe arithmetic --out runs/rl",
    "deepseek-model rl --recipe arithmetic --out runs/rl-control --control shuffled",
    "deepseek-model rl --recipe arithmetic --out runs/rl --minutes 1 && deepseek-model rl --recipe arithmetic "
    "--out runs/rl --resume",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `rl`."""
    p.add_argument("--recipe", required=True, choices=RECIPES, help="the task and its schedule")
    p.add_argument("--out", help=f"output directory (default {RECIPE_OUT}/, or {RECIPE_OUT}-control/ with --control)")
    p.add_argument("--minutes", type=float, help="wall-clock limit; the state is saved and --resume continues")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its saved state")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the problems split, initialisation and sampling")
    p.add_argument("--control", choices=CONTROL_CHOICES,
                   help="shuffled: the control run, rewards permuted within each batch")
    p.add_argument("--grpo-steps", type=int, help="GRPO steps (default: the recipe's)")
    p.add_argument("--pretrain-steps", type=int, help="supervised warm-up steps (default: the recipe's)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the recipe; bad arguments raise a one-line ValueError."""
    from deepseek_model.recipes.arithmetic import Recipe, run_recipe  # noqa: PLC0415 (imports torch)

    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError(f"--minutes must be a positive number, got {args.minutes:g}")
    check_threads(args.threads)
    if args.grpo_steps is not None and args.grpo_steps < 1:
        raise ValueError(f"--grpo-steps must be >= 1, got {args.grpo_steps}")
    if args.pretrain_steps is not None and args.pretrain_steps < 0:
        raise ValueError(f"--pretrain-steps must be >= 0, got {args.pretrain_steps}")
    changes = {"seed": args.seed, "control": args.control}
    if args.grpo_steps is not None:
        changes["grpo_steps"] = args.grpo_steps
    if args.pretrain_steps is not None:
        changes["pretrain_steps"] = args.pretrain_steps
    recipe = Recipe(**changes)
    out = args.out if args.out is not None else RECIPE_OUT + ("-control" if args.control else "")
    threads = args.threads if args.threads is not None else max(1, os.cpu_count() or 1)
    run_recipe(out, recipe, minutes=args.minutes, resume=args.resume, threads=threads, quiet=args.quiet)
    return 0
