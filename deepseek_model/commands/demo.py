"""demo: the main job end to end on a built-in tiny model, on CPU, in seconds."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from deepseek_model.config import ModelConfig
from deepseek_model.convert.checkpoint import CheckpointReader
from deepseek_model.loading import from_pretrained
from deepseek_model.summary import model_summary
from deepseek_model.testing import make_tiny_checkpoint

HELP = "build a tiny FP8 checkpoint with MTP, inspect it, load it, check it and generate (CPU, seconds)"
PROMPT = (1, 17, 42, 7, 99, 3)
ABSORB_TOL = 1e-5


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `demo`."""
    p.add_argument("--seed", type=int, default=0, help="checkpoint seed")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint to DIR and keep it")


def _greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    cache = model.new_cache()
    logits = model(prompt, 0, cache)
    out, pos = prompt, prompt.shape[1]
    for _ in range(n):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], 1)
        logits = model(nxt, pos, cache)
        pos += 1
    return out


def _run(path: str, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    make_tiny_checkpoint(path, "tiny", fp8=True, seed=args.seed)
    print(f"[1] wrote a tiny FP8 checkpoint with MTP in the published layout: {path} "
          f"({time.perf_counter() - t0:.2f} s)")
    with CheckpointReader(path) as reader:
        cfg = ModelConfig.from_dict(reader.config())
        s = model_summary(cfg, reader)
    p, c = s["parameters"], s["checkpoint"]
    print(f"[2] inspect: {p['total']:,} parameters ({p['active']:,} active per token, MTP {p['mtp']:,}); "
          f"fp8 weights {c['fp8_weights']}/{c['fp8_eligible']}; MTP present: {c['mtp_present']}")
    t0 = time.perf_counter()
    absorb = from_pretrained(path, dtype=torch.float32, weights="bf16", attn="absorb")
    naive = from_pretrained(path, dtype=torch.float32, weights="bf16", attn="naive")
    w8a8 = from_pretrained(path, dtype=torch.float32, weights="fp8")
    print(f"[3] loaded three ways (dequantized absorbed / naive, W8A8 fp8) in {time.perf_counter() - t0:.2f} s")
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        la, ln, l8 = absorb(prompt), naive(prompt), w8a8(prompt)
        diff = (la - ln).abs().max().item()
        print(f"[4] logits {tuple(la.shape)}, scale {la.abs().max().item():.3f}; absorbed vs naive max diff "
              f"{diff:.2e} ({'ok' if diff <= ABSORB_TOL else 'FAILED'}); W8A8 vs dequantized max diff "
              f"{(l8 - la).abs().max().item():.3f}")
        mtp = absorb.mtp_logits(prompt)
        print(f"[5] MTP logits {tuple(mtp.shape)}: row i predicts token i+2")
        t0 = time.perf_counter()
        tokens = _greedy(absorb, prompt, args.new_tokens)
        dt = time.perf_counter() - t0
    print(f"[6] greedy with the latent cache: {tokens[0, len(PROMPT):].tolist()} "
          f"({args.new_tokens / dt:.1f} tokens/s)")
    return 0 if diff <= ABSORB_TOL else 1


def run(args: argparse.Namespace) -> int:
    """Run the demo; non-zero if a self-check fails."""
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    torch.manual_seed(args.seed)
    if args.keep:
        return _run(args.keep, args)
    with tempfile.TemporaryDirectory(prefix="deepseek-demo-") as tmp:
        return _run(tmp, args)
