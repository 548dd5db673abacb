"""demo: the main job end to end on CPU in seconds.

The shipped mini-shakespeare model (trained here, FP8 layout) shows what the model paths do on
weights that have learned language: a continuation, held-out bits/byte, MTP speculative decoding
with its real acceptance and speed-up, and the FP8 numerics. A random tiny checkpoint then
exercises the mechanics: building the published layout, conversion, absorbed vs naive attention,
the kernels and the training loop.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from deepseek_model.commands.options import check_threads, seed_arg
from deepseek_model.config import ModelConfig
from deepseek_model.checkpoint.reader import CheckpointReader
from deepseek_model.evaluation import bits_per_byte, token_byte_lengths, windows
from deepseek_model.generate import generate
from deepseek_model.kernels import reference
from deepseek_model.loading import from_pretrained
from deepseek_model.pretrained import pretrained_path
from deepseek_model.summary import model_summary
from deepseek_model.testing import make_tiny_checkpoint
from deepseek_model.tokenizer import load_tokenizer
from deepseek_model.training import TrainConfig, build_model, train
from deepseek_model.training_data import SyntheticCorpus

HELP = ("run the shipped mini-shakespeare model (continuation, held-out bits/byte, MTP speculation, FP8), then "
        "build, inspect, convert, load and check a tiny FP8 checkpoint, kernels and training")
PRETRAINED = "mini-shakespeare"
HELD_OUT_SAMPLE = "heldout_sample.txt"  # a passage of a held-out play shipped beside the checkpoint
STORY_PROMPT = "KING.\nNow, my good lords,"
PROMPT = (1, 17, 42, 7, 99, 3)
TEXT_PROMPTS = ("Hello world!", "What is the capital of France?")
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.8, 0.95
SPEC_PROMPT_TOKENS, SPEC_NEW_TOKENS = 48, 96  # the speculative comparison (bench mini's prompt and length)
CACHE_FP8_REL_TOL = 0.05  # relative logit change from storing the latent cache in float8
ABSORB_TOL = 1e-5
CONVERT_TOL = 1e-5  # bf16 logits: converted checkpoint vs FP8 dequantized to bf16 at load (same weights)
KERNEL_SHAPE = (77, 256, 384)  # M (with a tail), K, N for the kernel self-check
TWIN_FP64_REL_TOL = 0.02  # W8A8 twin vs the fp64 product of its dequantized operands
TRAIN_STEPS, TRAIN_BATCH, TRAIN_SEQ = 8, 4, 32  # a few seconds of the balancing loop
DEMO_THREADS = 1  # tiny matmuls: one thread is fastest and immune to a busy machine
EXAMPLES = (
    'deepseek-model demo',
    'deepseek-model demo --threads 1 --keep /tmp/demo-tiny',
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `demo`."""
    p.add_argument("--seed", type=seed_arg, default=0, help="checkpoint seed")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens to generate")
    p.add_argument("--keep", metavar="DIR", help="write the tiny checkpoint to DIR and its bf16 conversion to DIR-bf16, "
                   "and keep both (each must be new or an empty directory)")
    p.add_argument("--threads", type=int, default=DEMO_THREADS, help="torch CPU threads")


def converted_dir(path: str) -> str:
    """Where the demo writes the bf16 conversion of the checkpoint at `path`: PATH-bf16 beside it."""
    return path.rstrip(os.sep) + "-bf16"


def _convert(path: str, prompt: torch.Tensor) -> tuple[str, bool]:
    """fp8→bf16 with the converter; the converted checkpoint's logits vs dequantizing at load."""
    from deepseek_model.convert.fp8 import fp8_to_bf16  # noqa: PLC0415 (the command layer, only here)

    dst = converted_dir(path)
    t0 = time.perf_counter()
    try:
        fp8_to_bf16(path, dst, quiet=True)
    except ValueError as e:  # a converter refusal is a failed check, reported, and the demo goes on
        return f"FAILED (the converter refused the checkpoint: {str(e).splitlines()[0]})", False
    converted = from_pretrained(dst, dtype=torch.bfloat16, mtp=False)
    at_load = from_pretrained(path, dtype=torch.bfloat16, weights="bf16", mtp=False)
    with torch.no_grad():
        diff = (converted(prompt) - at_load(prompt)).abs().max().item()
    ok = diff <= CONVERT_TOL
    return (f"fp8-to-bf16 in {time.perf_counter() - t0:.2f} s; loaded, logits vs dequantized-at-load max diff "
            f"{diff:.1e} in bf16 ({'ok' if ok else 'FAILED'})"), ok


def _kernel_check() -> tuple[str, bool]:
    """Triton (interpreter) vs torch twins when possible, else the torch twin vs fp64."""
    m, k, n = KERNEL_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    wq, ws = reference.weight_quant(w)
    a, a_s = reference.act_quant(x)
    twin = reference.fp8_gemm(a, a_s, wq, ws, torch.float32)
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            from deepseek_model.kernels import triton_ops  # noqa: PLC0415
        except ImportError:
            triton_ops = None
        if triton_ops is not None:
            ta, ta_s = triton_ops.act_quant(x)
            tw = triton_ops.fp8_gemm(ta, ta_s, wq, ws, torch.float32)
            same_q = torch.equal(ta.view(torch.uint8), a.view(torch.uint8)) and torch.equal(ta_s, a_s)
            diff = (tw - twin).abs().max().item()
            ok = same_q and diff <= 1e-4 * twin.abs().max().item()
            return (f"triton interpreter vs torch twins ({m}x{k}x{n}): act_quant bit-exact {same_q}, fp8_gemm max "
                    f"diff {diff:.1e} ({'ok' if ok else 'FAILED'})"), ok
    exact = (a.double() * a_s.double().repeat_interleave(reference.BLOCK, 1)[:, :k]) @ \
        reference.weight_dequant(wq, ws, dtype=torch.float32).double().T  # (M, N) fp64 of the same operands
    rel = ((twin.double() - exact).abs().max() / exact.abs().max()).item()
    ok = rel <= TWIN_FP64_REL_TOL
    return (f"torch twin fp8_gemm vs fp64 ({m}x{k}x{n}, no Triton interpreter): max relative diff {rel:.1e} "
            f"({'ok' if ok else 'FAILED'})"), ok


def _training_check(cfg: ModelConfig, seed: int) -> tuple[str, bool]:
    """A few steps of the full objective (CE + MTP + sequence balance) with the bias update."""
    model = build_model(cfg, seed=seed)
    corpus = SyntheticCorpus(cfg.vocab_size, seed=seed)
    tc = TrainConfig(steps=TRAIN_STEPS, batch_size=TRAIN_BATCH, seq_len=TRAIN_SEQ, seed=seed)
    t0 = time.perf_counter()
    hist = train(model, corpus, tc).history
    first, last = hist[0], hist[-1]
    ok = last["lm_loss"] < first["lm_loss"]
    return (f"{TRAIN_STEPS} AdamW steps (CE + {tc.mtp_lambda}·MTP + balance, bias update γ={tc.gamma}) in "
            f"{time.perf_counter() - t0:.1f} s: max/mean expert load {first['max_over_mean']:.2f} → "
            f"{last['max_over_mean']:.2f} (reported, not checked: {TRAIN_STEPS} steps on random tokens), MTP loss "
            f"{first['mtp_loss']:.3f} → {last['mtp_loss']:.3f}; check: CE went down {first['lm_loss']:.3f} → "
            f"{last['lm_loss']:.3f} ({'ok' if ok else 'FAILED'})"), ok


def _pretrained(args: argparse.Namespace, checks: dict[str, bool]) -> None:
    """[1]–[4]: the shipped trained model."""
    path = pretrained_path(PRETRAINED)
    t0 = time.perf_counter()
    model = from_pretrained(path, dtype=torch.float32, weights="bf16")
    tok = load_tokenizer(path)
    cfg = model.cfg
    with CheckpointReader(path) as reader:
        s = model_summary(cfg, reader)
    p, c = s["parameters"], s["checkpoint"]
    print(f"[1] loaded the shipped '{PRETRAINED}' (DeepSeek-V3 in miniature trained on Shakespeare, FP8 layout: "
          f"{c['fp8_weights']}/{c['fp8_eligible']} weights in e4m3) in {time.perf_counter() - t0:.2f} s: "
          f"{p['total'] / 1e6:.1f}M parameters ({p['active'] / 1e6:.1f}M active per token) + MTP module "
          f"{p['mtp'] / 1e6:.1f}M (embedding and head shared), {cfg.num_hidden_layers} layers, "
          f"{cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}), context {cfg.max_position_embeddings}")
    with open(os.path.join(path, HELD_OUT_SAMPLE), encoding="utf-8") as f:
        text = f.read()
    wins = windows([tok.encode(text, add_bos=False)], cfg.max_position_embeddings)
    m = bits_per_byte(model, wins, token_byte_lengths(tok))
    print(f"[2] held-out bits/byte on a passage of a play never seen in training ({m.bytes} bytes): "
          f"{m.bits_per_byte:.3f} (a uniform byte model: 8.0)")
    prompt = tok.encode(STORY_PROMPT)
    held_prompt = tok.encode(text, add_bos=False)[:SPEC_PROMPT_TOKENS]  # a held-out prompt, as bench mini uses
    generate(model, [held_prompt], max_new_tokens=2, eos=[], speculative="mtp")  # warm-up
    t0 = time.perf_counter()
    plain = generate(model, [held_prompt], max_new_tokens=SPEC_NEW_TOKENS, eos=[])
    dt_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    spec = generate(model, [held_prompt], max_new_tokens=SPEC_NEW_TOKENS, eos=[], speculative="mtp")
    dt_spec = time.perf_counter() - t0
    checks["MTP greedy == plain greedy"] = spec.tokens == plain.tokens
    st = spec.stats
    sampled = generate(model, [prompt], max_new_tokens=args.new_tokens, eos=[], temperature=SAMPLE_TEMPERATURE,
                       top_p=SAMPLE_TOP_P, seed=args.seed)
    print(f"[3] sampled continuation (temperature {SAMPLE_TEMPERATURE}, top-p {SAMPLE_TOP_P}):")
    for line in (STORY_PROMPT + tok.decode(sampled.tokens[0])).splitlines():
        print(f"      | {line}")
    print(f"    MTP speculative decoding, greedy, {SPEC_NEW_TOKENS} tokens after the first {SPEC_PROMPT_TOKENS} tokens of "
          f"the held-out passage: identical tokens {checks['MTP greedy == plain greedy']}, acceptance "
          f"{st.acceptance_rate:.2f} ({st.accepted}/{st.drafted}), {st.tokens_per_forward:.2f} tokens per main "
          f"forward, {plain.stats.new_tokens / dt_plain:.0f} → {st.new_tokens / dt_spec:.0f} tokens/s "
          f"({dt_plain / dt_spec:.2f}x)")
    ids = torch.tensor([tok.encode(text[:600], add_bos=False)])
    w8a8 = from_pretrained(path, dtype=torch.float32, weights="w8a8", mtp=False)
    with torch.no_grad():
        ref = model(ids)
        rel_w8 = ((w8a8(ids) - ref).norm() / ref.norm()).item()
        rel_cache = ((model(ids, 0, model.new_cache(fp8=True)) - ref).norm() / ref.norm()).item()
    checks["fp8 latent cache"] = rel_cache <= CACHE_FP8_REL_TOL
    print(f"[4] FP8 numerics on held-out text: W8A8 (1x128 activations) vs weight-only logits relative diff "
          f"{rel_w8:.4f}; float8 latent cache {rel_cache:.4f} ({'ok' if checks['fp8 latent cache'] else 'FAILED'})")


def _run(path: str, args: argparse.Namespace) -> int:
    start = time.perf_counter()
    checks: dict[str, bool] = {}
    _pretrained(args, checks)
    t0 = time.perf_counter()
    make_tiny_checkpoint(path, "tiny", fp8=True, seed=args.seed)
    print(f"[5] mechanics on a random tiny checkpoint: wrote FP8 + MTP + BPE tokenizer in the published layout "
          f"({time.perf_counter() - t0:.2f} s)")
    with CheckpointReader(path) as reader:
        cfg = ModelConfig.from_dict(reader.config())
    absorb = from_pretrained(path, dtype=torch.float32, weights="bf16", attn="absorb")
    naive = from_pretrained(path, dtype=torch.float32, weights="bf16", attn="naive")
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        diff = (absorb(prompt) - naive(prompt)).abs().max().item()
    checks["absorbed vs naive"] = diff <= ABSORB_TOL
    print(f"    absorbed vs naive attention max diff {diff:.2e} ({'ok' if checks['absorbed vs naive'] else 'FAILED'})")
    line, checks["conversion"] = _convert(path, prompt)
    print(f"    convert: {line}")
    tok = load_tokenizer(path)
    plain = generate(absorb, list(TEXT_PROMPTS), max_new_tokens=8, eos=[], tokenizer=tok, chat=True)
    spec = generate(absorb, list(TEXT_PROMPTS), max_new_tokens=8, eos=[], tokenizer=tok, chat=True,
                    speculative="mtp")
    checks["batched chat generation"] = spec.tokens == plain.tokens
    print(f"    batched chat-template generation of {len(TEXT_PROMPTS)} prompts of different lengths, plain == MTP "
          f"speculative: {checks['batched chat generation']}")
    line, checks["kernels"] = _kernel_check()
    print(f"[6] kernels: {line}")
    line, checks["training"] = _training_check(cfg, args.seed)
    print(f"[7] training: {line}")
    failed = [k for k, ok in checks.items() if not ok]
    print(f"[8] report: {len(checks) - len(failed)}/{len(checks)} checks ok"
          f"{' (FAILED: ' + ', '.join(failed) + ')' if failed else ''}; {time.perf_counter() - start:.1f} s total")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """Run the demo; non-zero if a self-check fails."""
    if args.new_tokens < 1:
        raise ValueError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    check_threads(args.threads)
    if args.keep is not None:  # both directories are checked before any work
        from deepseek_model.convert.io import check_new_dir  # noqa: PLC0415

        keep = check_new_dir(args.keep, "--keep")
        check_new_dir(converted_dir(keep), "--keep's conversion directory")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.keep is not None:
        return _run(keep, args)
    with tempfile.TemporaryDirectory(prefix="deepseek-demo-") as tmp:
        return _run(os.path.join(tmp, "tiny-fp8"), args)
