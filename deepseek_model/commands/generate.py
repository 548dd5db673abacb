"""generate: continue a prompt (text, a file of prompts, or token ids) with a checkpoint, on CPU or GPU."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from deepseek_model import parallel
from deepseek_model.commands.options import Once, check_finite, check_threads, read_text, seed_arg, utf8_lines
from deepseek_model.generate import GenerationResult, generate
from deepseek_model.loading import WEIGHT_FORMATS, from_pretrained
from deepseek_model.tokenizer import Tokenizer, load_tokenizer

HELP = "generate text or token ids from a checkpoint (greedy or sampled, optional MTP speculative decoding)"
QUIT_WORDS = ("exit", "quit")
EXAMPLES = (
    "deepseek-model generate mini-shakespeare --prompt 'MACBETH.' --speculative mtp --stats",
    'deepseek-model generate CKPT --input-file prompts.txt --temperature 0.7 --top-p 0.9',
    'torchrun --nproc-per-node 2 -m deepseek_model.cli generate CKPT --prompt Hello',
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `generate`."""
    p.add_argument("ckpt", help="checkpoint directory (config.json, index, shards, tokenizer files)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action=Once, help="prompt text (needs tokenizer.json in CKPT)")
    src.add_argument("--input-file", action=Once, metavar="FILE", help="one text prompt per line (batched); - reads stdin")
    src.add_argument("--token-ids", type=int, nargs="+", metavar="ID", help="prompt as token ids")
    src.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    p.add_argument("--chat", action="store_true", help="wrap text prompts in the checkpoint's chat template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=seed_arg, default=0, help="sampling seed (prompt i of a batch samples with seed + i)")
    p.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto",
                   help="bf16: dequantize FP8 at load; fp8: keep FP8, dequantize per GEMM (weight-only); "
                        "w8a8: FP8 activations too; auto (default): w8a8 on a GPU with native FP8 GEMMs, else fp8 "
                        "for an FP8 checkpoint, bf16 for a dense one")
    p.add_argument("--attn", choices=["absorb", "naive", "auto"], default="absorb",
                   help="attention math (default absorb; auto: naive for the prompt, absorbed for decoding)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--fp8-cache", action="store_true",
                   help="float8 latent cache (per-token scale); a V3.2 model keeps its index keys in float8 too")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a row's logits do not depend on the batch, chunking or speculation (bit-identical)")
    p.add_argument("--cpu-pack", action="store_true",
                   help="also keep oneDNN-blocked copies of the float weights, read by the CPU GEMMs (faster prompts, "
                        "batches and bfloat16 decoding, for twice the weight memory)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--stats", action="store_true", help="print acceptance rate, tokens per forward, speed")


def _check(args: argparse.Namespace) -> None:
    if not os.path.isdir(args.ckpt):
        raise ValueError(f"{args.ckpt}: not a checkpoint directory")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    check_threads(args.threads)
    check_finite(args.temperature, "--temperature")
    check_finite(args.top_p, "--top-p")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature:g}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p:g}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = no top-k filter), got {args.top_k}")
    if args.chat and args.token_ids:
        raise ValueError("--chat applies to text prompts, not --token-ids")
    if args.cpu_pack and args.batch_invariant:
        raise ValueError("--cpu-pack and --batch-invariant exclude each other: batch-invariant GEMMs read the "
                         "weights themselves on fixed row tiles")


def _prompts(args: argparse.Namespace) -> list[str] | list[list[int]]:
    if args.token_ids:
        return [args.token_ids]
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as surrogates
            raise ValueError("--prompt: not UTF-8 text") from None
        return [args.prompt]
    text = read_text(args.input_file, "--input-file")
    lines = [line.removesuffix("\r") for line in text.split("\n")]  # lines end at \n (or \r\n) only
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise ValueError(f"--input-file {args.input_file}: no prompts in it")
    return lines


def _print(result: GenerationResult, tok: Tokenizer | None, as_text: bool, stats: bool) -> None:
    for i, ids in enumerate(result.tokens):
        body = tok.decode(ids) if as_text and tok is not None else " ".join(map(str, ids))
        prefix = f"[{i}] " if len(result.tokens) > 1 else ""
        print(f"{prefix}{body}")
    if stats:
        s = result.stats
        rate = s.new_tokens / s.decode_seconds if s.decode_seconds else float("nan")
        print(f"stats: {s.new_tokens} tokens, {s.main_forwards} main forwards, {s.tokens_per_forward:.2f} tokens per "
              f"forward, acceptance {s.acceptance_rate:.2f} ({s.accepted}/{s.drafted}), {rate:.1f} tokens/s decode, "
              f"finish {','.join(result.finish_reasons)}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, generate, print the continuations (text, or ids for --token-ids)."""
    _check(args)
    ctx = parallel.init()  # joins the job when started by torchrun; single process otherwise
    if args.interactive and ctx.is_distributed:
        raise ValueError("--interactive reads stdin in one process; under torchrun use --prompt, --input-file "
                         "or --token-ids")
    if args.threads:
        torch.set_num_threads(args.threads)
    needs_text = not args.token_ids
    tok = load_tokenizer(args.ckpt) if needs_text or os.path.isfile(os.path.join(args.ckpt, "tokenizer.json")) else None
    model = from_pretrained(args.ckpt, dtype=args.dtype, attn=args.attn, weights=args.weights,
                            mtp=args.speculative == "mtp", parallel=ctx, batch_invariant=args.batch_invariant,
                            cpu_pack=args.cpu_pack,
                            device=ctx.device if ctx.is_distributed else "cpu")  # NCCL ranks: their own GPU
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              speculative=args.speculative, seed=args.seed, cache_fp8=args.fp8_cache, tokenizer=tok, chat=args.chat)
    if not args.interactive:
        result = generate(model, _prompts(args), **kw)  # every rank samples the same tokens (same logits, same seed)
        if ctx.is_main:
            _print(result, tok, needs_text, args.stats)
        parallel.shutdown(ctx)
        return 0
    print("type a prompt and press enter (exit or Ctrl-D to quit)", file=sys.stderr)
    for line in utf8_lines(sys.stdin, "stdin (--interactive)"):
        text = line.strip()
        if text in QUIT_WORDS:
            break
        if not text:
            continue
        try:
            _print(generate(model, [text], **kw), tok, True, args.stats)
        except ValueError as e:  # bad input keeps the session alive
            print(f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
    return 0
