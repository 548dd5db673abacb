"""Model benchmark: prefill and decode tokens/s and cache bytes per token, side by side with transformers.

Both models run the same `small` checkpoint (configs/small.json, built with make_tiny_checkpoint;
`--config tiny` runs the same measurements on the tiny one, a quick check of the mechanics),
in the same dtype and with the same thread count, in one process, with alternating trials. Ours is
loaded with cpu_pack=True (oneDNN-blocked weight copies; `--no-cpu-pack`: the weights alone). Prefill
is timed as generation runs it (logits of the last position only; transformers: logits_to_keep=1).
Reported as ratios against the peer measured in the same run:
- prefill tokens/s (goal ≥ 1.2× transformers) and decode tokens/s (goal ≥ 2× at 1k context) at
  context lengths 128/512/1024(/2048), batch 1 and 8;
- decode vs the weight-streaming floor: active weight bytes (+ cache bytes read) per decode step
  ÷ the copy bandwidth measured in the same run (goal: within 3×; 1k batch 1: within 1.3×);
- prefill vs its floor: the chunk's FLOPs (2 per active weight + causal attention) ÷ the GEMM rate
  of a 1024³ product in the same dtype, measured in the same run (the faster of a plain matmul and
  a oneDNN-packed weight, the GEMM our model runs); every cell is checked against
  "≥ 1.5× transformers or within 1.2× of its floor";
- cache bytes per token: latent (kv_lora_rank + rope)·bytes·layers vs transformers' per-head K/V
  (for this config and for DeepSeek-V3's dims);
- the fp8 latent cache (logit error and bytes) and a torch.compile'd decode step (identical tokens,
  speed-up; if compile fails on this box, the error is reported instead);
- weight-only FP8 (`weights="fp8"`, what "auto" runs on a CPU) vs the same FP8 checkpoint dequantized
  at load: decode tokens/s as a ratio, and the weight bytes of each;
- a bfloat16 run also times the float32 prefill of the same weights at context 1k, batch 1 (both
  packed, alternating trials): where the CPU has AMX, bfloat16 should be ≥ 2.5× faster there; the
  CPU's features (AMX, AVX-512 bf16, torch's kernel capability) are recorded with every run;
- DeepSeek-V3.2 sparse attention vs dense: the `small` config with a lightning indexer (index_topk
  SPARSE_TOPK) against the same weights run as V3 (indexer dropped, every token attended), at
  contexts of 4x (and 8x) index_topk, batch 1: prefill, a decode step of the whole model, and a
  decode step of one layer's attention alone (indexer + selection + attention vs dense attention),
  as ratios (goal: sparse faster); and the prefill crossover: whole-model prefill, and one layer's
  attention over the prefill chunk, of the same weights with a smaller index_topk
  (--crossover-topk) at 4x, 16x and 32x it, where a sparse prefill starts to pay off on this CPU;
  each ratio is reported as a goal met / NOT met. `--sparse-only` runs this comparison alone.
Writes results.json, results.md and results.png (matplotlib Agg) into --out. The memory a run needs
is estimated from its arguments before anything is built, and a run that would not fit is refused.

Usage: python -m deepseek_model.benchmarks.bench_model [--quick] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from deepseek_model import memory, plotting
from deepseek_model.benchmarks import results_io
from deepseek_model.commands.parser import Parser
from deepseek_model.config import ConfigError, ModelConfig
from deepseek_model.generate import generate
from deepseek_model.kernels import cpu_pack
from deepseek_model.kernels.cpu_pack import PackedWeight
from deepseek_model.loading import from_pretrained
from deepseek_model.testing import make_tiny_checkpoint, write_dense_twin

DEFAULT_OUT = "bench_out/model"
CONTEXTS = (128, 512, 1024, 2048)
QUICK_CONTEXTS = (128, 1024)
BATCHES = (1, 8)
QUICK_BATCHES = (1, 8)
DECODE_STEPS = 8
QUICK_DECODE_STEPS = 4
TRIALS = 3
QUICK_TRIALS = 3
WEIGHT_ONLY_CONTEXT = 128  # the weight-only FP8 and batch-invariant decode comparisons (or the shortest --contexts)
WARMUP_CONTEXT = 64
GOAL_CONTEXT = 1024
GOAL_DECODE = 2.0
GOAL_PREFILL = 1.2
GOAL_FLOOR = 3.0
COPY_BYTES = 256 * 2 ** 20  # the bandwidth probe copies a 256 MiB buffer
GEMM_SIZE = 1024  # the GEMM-rate probe: a 1024³ matmul in the benchmark's dtype
GOAL_CELL_RATIO = 1.5  # every cell: >= 1.5x transformers ...
GOAL_CELL_FLOOR = 1.2  # ... or within 1.2x of its floor
GOAL_DECODE_FLOOR_1K = 1.3  # the 1k batch-1 decode step vs the weight-streaming floor
GOAL_BF16_PREFILL = 2.5  # where the CPU has AMX: bfloat16 prefill vs float32 at GOAL_CONTEXT, batch 1
CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f")  # recorded from /proc/cpuinfo
COMPILE_TOKENS = 16
FP8_CACHE_TOKENS = 64
MAX_ERROR_CHARS = 300
V3_CONFIG = "deepseek-v3"
BENCH_CONFIGS = ("small", "tiny")  # --config: the recorded runs use small
SPARSE_TOPK = 2048  # the V3.2 comparison's index_topk: the published value (of up to 163,840 positions)
SPARSE_INDEX = {"index_n_heads": 8, "index_head_dim": 64}  # published: 64 x 128
SPARSE_CONTEXTS = (8192, 16384)  # 4 and 8 x SPARSE_TOPK
QUICK_SPARSE_CONTEXTS = (8192,)
SPARSE_DECODE_STEPS = 16  # decode steps are short: more of them per trial keep the ratio steady
SPARSE_LAYER = 1  # the layer whose attention is also timed alone
CROSSOVER_TOPK = 256  # the prefill crossover's index_topk: small, so that 32 x it stays a quick prefill
CROSSOVER_MULTIPLES = (4, 16, 32)  # the crossover's prefill contexts, in multiples of its index_topk
CROSSOVER_TRIALS = 2


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="deepseek-model bench model", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory for results.{json,md,png}")
    p.add_argument("--json", default=None, help="also write the JSON report to this file")
    p.add_argument("--quick", action="store_true", help="contexts 128/1024 (V3.2: 8192), fewer decode steps")
    p.add_argument("--threads", type=int, default=None, help="torch threads for both models (default: torch's)")
    p.add_argument("--config", choices=BENCH_CONFIGS, default=BENCH_CONFIGS[0],
                   help="the benchmarked architecture (random weights; tiny: a quick check of the mechanics)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="both models' dtype")
    p.add_argument("--contexts", type=int, nargs="*", default=None, help="context lengths (overrides the defaults)")
    p.add_argument("--batches", type=int, nargs="*", default=None, help="batch sizes (overrides the defaults)")
    p.add_argument("--sparse-contexts", type=int, nargs="*", default=None,
                   help=f"contexts of the V3.2 sparse-vs-dense comparison (index_topk {SPARSE_TOPK}; default "
                        f"{' '.join(map(str, SPARSE_CONTEXTS))}, --quick {' '.join(map(str, QUICK_SPARSE_CONTEXTS))})")
    p.add_argument("--no-sparse", action="store_true", help="skip the V3.2 sparse-vs-dense comparison")
    p.add_argument("--sparse-only", action="store_true",
                   help="run the V3.2 sparse-vs-dense comparison alone (no V3 grid, transformers or extras)")
    p.add_argument("--crossover-topk", type=int, default=CROSSOVER_TOPK,
                   help=f"index_topk of the V3.2 prefill crossover rows (contexts "
                        f"{' and '.join(map(str, CROSSOVER_MULTIPLES))} x it; default {CROSSOVER_TOPK})")
    p.add_argument("--attn", choices=["auto", "absorb", "naive"], default="auto",
                   help="our attention mode (auto: naive math for prefill chunks, absorbed decode)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode comparison")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (our numbers only)")
    p.add_argument("--no-cpu-pack", action="store_true",
                   help="load our model without its oneDNN-blocked weight copies (cpu_pack=False)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error("--threads: expected a positive integer")
    if args.crossover_topk < 1:
        p.error("--crossover-topk: expected a positive integer")
    if args.sparse_only and args.no_sparse:
        p.error("--sparse-only and --no-sparse exclude each other")
    for name in ("contexts", "batches", "sparse_contexts"):
        vals = getattr(args, name)
        if vals is not None and (not vals or min(vals) < 1):
            p.error(f"--{name.replace('_', '-')}: expected positive integers")
    results_io.check_outputs(p, args.out, {"--json": args.json})
    from deepseek_model.config import builtin_config_dict  # noqa: PLC0415

    longest = builtin_config_dict(args.config)["max_position_embeddings"]
    steps = QUICK_DECODE_STEPS if args.quick else DECODE_STEPS
    for ctx in args.contexts or ():
        if ctx + steps + 1 > longest:  # the prefill, then its token and `steps` decode steps
            p.error(f"--contexts: {ctx} + {steps + 1} decoded positions exceed the {args.config} config's "
                    f"max_position_embeddings {longest}")
    if args.sparse_contexts:
        args.sparse_contexts = list(dict.fromkeys(args.sparse_contexts))  # each context once
    try:
        grid, sparse = _run_bytes(args)
    except ConfigError as e:  # a V3.2 context past the config's sanity bounds
        p.error(f"--sparse-contexts/--crossover-topk: {e}")
    flags = "--sparse-contexts/--crossover-topk" if sparse > grid else "--contexts/--batches"
    try:
        memory.require(max(grid, sparse), f"bench model (the {args.config} config at the largest context and batch)")
    except memory.InsufficientMemory as e:
        p.error(f"{flags}: {e}")
    return args


def _sparse_contexts(args: argparse.Namespace) -> tuple[int, ...]:
    """The contexts of the V3.2 comparison at index_topk SPARSE_TOPK."""
    return tuple(args.sparse_contexts or (QUICK_SPARSE_CONTEXTS if args.quick else SPARSE_CONTEXTS))


def _v32_config_dict(args: argparse.Namespace) -> dict:
    """The V3.2 comparison's config: --config with a lightning indexer (SPARSE_INDEX, index_topk
    SPARSE_TOPK), its positions reaching the longest V3.2 context (crossover included)."""
    from deepseek_model.config import builtin_config_dict  # noqa: PLC0415

    base = builtin_config_dict(args.config)
    longest = max(*_sparse_contexts(args), max(CROSSOVER_MULTIPLES) * args.crossover_topk)
    return dict(base, model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"], index_topk=SPARSE_TOPK,
                max_position_embeddings=max(base["max_position_embeddings"], longest + 1), **SPARSE_INDEX)


def _run_bytes(args: argparse.Namespace) -> tuple[int, int]:
    """Memory a run needs at once, estimated before anything is built, for its two parts: the V3 grid
    (our weights and their packed copies, transformers' weights and its per-head K/V cache, and our
    generation working memory at the longest context and largest batch) and the V3.2 comparison (its
    three models' weights, the working memory of a batch-1 prefill at its longest context, and the
    (T, index_topk) selection, on top of the grid's models, which stay loaded). 0 for a part the run
    skips."""
    cfg = ModelConfig.builtin(args.config)
    esize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    weights = memory.model_bytes(cfg, esize, mtp=False)
    copies = 1 + (not args.no_cpu_pack)  # the weights and their oneDNN-blocked copies
    grid = 0
    if not args.sparse_only:
        longest = max(args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS))
        widest = max(args.batches or (QUICK_BATCHES if args.quick else BATCHES))
        total = longest + DECODE_STEPS
        hf_cache = 0 if args.no_hf else (widest * total * cfg.num_hidden_layers * cfg.num_attention_heads
                                         * (cfg.qk_head_dim + cfg.v_head_dim) * esize)
        resident = weights * (copies + (not args.no_hf))
        grid = resident + hf_cache + memory.generation_bytes(cfg, widest, longest, total, esize)
    else:
        resident = 0
    sparse = 0
    if not args.no_sparse:
        v32 = ModelConfig.from_dict(_v32_config_dict(args))
        ctx = v32.max_position_embeddings
        sparse = (resident + 3 * memory.model_bytes(v32, esize, mtp=False) * copies  # V3.2, its V3 twin, a copy
                  + memory.generation_bytes(v32, 1, ctx, ctx + 1, esize) + ctx * SPARSE_TOPK * 8)
    return grid, sparse


def _best_seconds(fn, trials: int = CROSSOVER_TRIALS + 1) -> float:
    """Best wall time of `trials` calls of fn after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(trials):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(trials: int = TRIALS) -> float:
    """Bytes moved per second (read + write) by a large tensor copy, measured now (the warm-up call
    pages in both buffers)."""
    src = torch.ones(COPY_BYTES // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / _best_seconds(lambda: dst.copy_(src), trials)


def active_weight_bytes(cfg: ModelConfig, element_size: int) -> int:
    """Weight bytes one decode token reads (batch 1): attention, dense MLPs, shared + top-k routed
    experts, the router, norms, and the head (the embedding lookup reads one row)."""
    h = cfg.hidden_size
    q = h * cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_attention_heads * cfg.qk_head_dim \
        if cfg.q_lora_rank else h * cfg.num_attention_heads * cfg.qk_head_dim
    attn = q + h * cfg.latent_dim + cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
        + cfg.num_attention_heads * cfg.v_head_dim * h
    expert = 3 * h * cfg.moe_intermediate_size
    params = 0
    for layer in range(cfg.num_hidden_layers):
        params += attn + 2 * h
        if cfg.is_moe_layer(layer):
            params += (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert + cfg.n_routed_experts * h
        else:
            params += 3 * h * cfg.intermediate_size
    params += h * cfg.vocab_size + h + h  # head, final norm, one embedding row
    return params * element_size


def gemm_rates(dtype: torch.dtype, trials: int = TRIALS) -> dict[str, float]:
    """FLOP/s of a GEMM_SIZE³ product in `dtype` on this CPU with the current thread count, measured
    now (best of `trials`; AMX runs the bfloat16 one where the CPU has it): "matmul" (a @ b, the
    BLAS) and "packed" (a weight in oneDNN's blocked layout, the GEMM the packed model runs)."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE).to(dtype)
    flops = 2 * GEMM_SIZE ** 3
    rates = {"matmul": flops / _best_seconds(lambda: a @ b, trials)}  # warm-up: kernel selection, page-in
    if cpu_pack.available():
        packed = PackedWeight.of(b)
        rates["packed"] = flops / _best_seconds(lambda: packed.linear(a), trials)
    return rates


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """What this CPU offers the GEMMs: torch's kernel capability ("AVX512", ...) and, where the
    flags can be read (Linux), whether each of CPU_FLAGS is present; "amx" is True when the CPU
    has AMX bfloat16 tiles (the flag, or torch's own probe where no flags can be read)."""
    out: dict = {"capability": torch.backends.cpu.get_cpu_capability()}
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is not None:
        out.update({flag: flag in flags for flag in CPU_FLAGS})
        out["amx"] = out["amx_bf16"]
    else:
        probe = getattr(torch._C._cpu, "_init_amx", None)  # asks the OS for AMX tile state; False without AMX
        out["amx"] = bool(probe()) if probe is not None else None
    return out


def _prefill_seconds(model, ids: torch.Tensor) -> float:
    """Seconds of one prefill of `ids` as generation runs it (the last position's logits only)."""
    t0 = time.perf_counter()
    _Ours(model).prefill(ids)
    return time.perf_counter() - t0


def _bf16_vs_fp32_prefill(path: str, bf16_model, args: argparse.Namespace, ctx: int, gen: torch.Generator,
                          trials: int, amx: bool | None) -> dict:
    """Prefill tokens/s of the bfloat16 model vs the same weights in float32 (loaded as ours is),
    context `ctx`, batch 1, alternating trials (medians), and the goal's verdict for this CPU."""
    fp32 = from_pretrained(path, dtype=torch.float32, mtp=False, attn=args.attn, cpu_pack=not args.no_cpu_pack)
    ids = torch.randint(0, fp32.cfg.vocab_size, (1, ctx), generator=gen)
    models = {"bfloat16": bf16_model, "float32": fp32}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():
        _prefill_seconds(m, ids[:, :WARMUP_CONTEXT])  # first-call costs
    for _ in range(trials):
        for k, m in models.items():
            times[k].append(_prefill_seconds(m, ids))
    rate = {k: ctx / statistics.median(v) for k, v in times.items()}
    ratio = rate["bfloat16"] / rate["float32"]
    out = {"context": ctx, "batch": 1, "bf16_prefill_tok_s": rate["bfloat16"], "fp32_prefill_tok_s": rate["float32"],
           "ratio": ratio, "cpu_has_amx": amx}
    print(f"bf16 vs fp32 prefill (ctx {ctx}, B 1): {rate['bfloat16']:.0f} vs {rate['float32']:.0f} tok/s "
          f"({ratio:.2f}x); AMX: {amx}", flush=True)
    return out


def _bf16_goal(entry: dict) -> str:
    """The AMX goal's verdict for one bf16-vs-fp32 prefill measurement."""
    ratio = f"{entry['ratio']:.2f}×"
    if entry["cpu_has_amx"] is False:
        return f"not applicable: this CPU has no AMX ({ratio} without it)"
    if entry["cpu_has_amx"] is None:
        return f"{ratio} (whether this CPU has AMX could not be read)"
    return f"{ratio} ({'met' if entry['ratio'] >= GOAL_BF16_PREFILL else 'NOT met'})"


def _rates_text(rates: dict[str, float]) -> str:
    """'matmul 93, packed 110 GFLOP/s' from {kernel: GFLOP/s}."""
    return ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " GFLOP/s"


def prefill_flops_per_token(cfg: ModelConfig, ctx: int) -> float:
    """FLOPs one prefill token costs: 2 per active weight (no output head: a prefill computes the
    last position's logits only) plus causal attention over (ctx + 1) / 2 keys on average, in the
    naive form (per head: q·k over qk_head_dim, p·v over v_head_dim), every layer."""
    weights = active_weight_bytes(cfg, 1) - cfg.hidden_size * cfg.vocab_size
    attention = (ctx + 1) / 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return 2 * (weights + attention)


def cache_bytes_per_token(cfg: ModelConfig, element_size: int) -> dict[str, float]:
    """Latent vs per-head K/V cache bytes per token over all layers, and their ratio."""
    latent = cfg.latent_dim * element_size * cfg.num_hidden_layers
    per_head = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * element_size * cfg.num_hidden_layers
    return {"latent": latent, "per_head_kv": per_head, "ratio": per_head / latent}


class _Ours:
    """Adapter: prefill / decode of deepseek_model with its latent cache."""

    name = "deepseek_model"

    def __init__(self, model, fp8_cache: bool = False):
        self.model, self.fp8_cache = model, fp8_cache

    def prefill(self, ids: torch.Tensor):
        cache = self.model.new_cache(fp8=self.fp8_cache)
        return self.model.head(self.model.hidden(ids, 0, cache)[:, -1]), cache  # last position only

    def decode(self, tok: torch.Tensor, pos: int, cache):
        return self.model(tok, pos, cache)[:, -1], cache

    @staticmethod
    def cache_bytes(cache, bsz: int, tokens: int) -> float:
        per_layer = [c for c in cache.layers if c.kv is not None]
        used = sum((c.kv[:, :tokens].numel() * c.kv.element_size() + c.pe[:, :tokens].numel() * c.pe.element_size())
                   for c in per_layer)
        return used / (bsz * tokens)


class _HF:
    """Adapter: prefill / decode of transformers DeepseekV3ForCausalLM with its DynamicCache."""

    name = "transformers"

    def __init__(self, model):
        import inspect  # noqa: PLC0415

        self.model = model
        # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def _cache_of(self, out):
        return out.cache if self.cache_arg == "cache" else out.past_key_values

    def prefill(self, ids: torch.Tensor):
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as transformers' generate does
        return out.logits[:, -1].float(), self._cache_of(out)

    def decode(self, tok: torch.Tensor, pos: int, cache):
        out = self.model(input_ids=tok, use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1].float(), self._cache_of(out)

    @staticmethod
    def cache_bytes(cache, bsz: int, tokens: int) -> float:
        total = 0
        for layer in cache.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None and t.numel():
                    total += t.numel() * t.element_size()
        return total / (bsz * tokens)


def _one_trial(runner, ids: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(prefill seconds, seconds for `steps` greedy decode steps after one untimed step, cache B/token)."""
    bsz, ctx = ids.shape
    t0 = time.perf_counter()
    logits, cache = runner.prefill(ids)
    prefill = time.perf_counter() - t0
    tok = logits.argmax(-1, keepdim=True)  # (B, 1)
    logits, cache = runner.decode(tok, ctx, cache)  # warm-up step, untimed
    tok = logits.argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for i in range(steps):
        logits, cache = runner.decode(tok, ctx + 1 + i, cache)
        tok = logits.argmax(-1, keepdim=True)
    return prefill, time.perf_counter() - t0, runner.cache_bytes(cache, bsz, ctx + 1 + steps)


def _measure(runners: list, ids: torch.Tensor, steps: int, trials: int) -> list[dict]:
    """Per runner: prefill tokens/s, decode tokens/s, cache bytes/token. Trials alternate between the
    runners so that load changes on a shared machine hit both alike; medians are reported."""
    bsz, ctx = ids.shape
    times: list[list[tuple[float, float, float]]] = [[] for _ in runners]
    for _ in range(trials):
        for i, runner in enumerate(runners):
            times[i].append(_one_trial(runner, ids, steps))
    out = []
    for ts in times:
        pre, dec = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        out.append({"prefill_tok_s": bsz * ctx / pre, "decode_tok_s": bsz * steps / dec, "decode_step_s": dec / steps,
                    "cache_bytes_per_token": ts[-1][2]})
    return out


def _decode_rates(models: list, ids: torch.Tensor, steps: int, trials: int) -> list[float]:
    """Decode tokens/s of each model after one untimed prefill of `ids` [B, ctx]: alternating trials of
    `steps` one-token steps at position ctx (each rewrites that slot, so every trial does equal work)."""
    bsz, ctx = ids.shape
    tok = ids[:, :1]  # (B, 1)
    caches = []
    for model in models:
        caches.append(model.new_cache())
        model.hidden(ids, 0, caches[-1])  # prefill, no logits
        _decode_step_seconds(model, caches[-1], ctx, tok, 1)  # warm-up
    times: list[list[float]] = [[] for _ in models]
    for _ in range(trials):
        for model, cache, ts in zip(models, caches, times):
            ts.append(_decode_step_seconds(model, cache, ctx, tok, steps))
    return [bsz / statistics.median(ts) for ts in times]


def _extras_context(args: argparse.Namespace) -> int:
    """Context of the weight-only FP8 and batch-invariant comparisons: WEIGHT_ONLY_CONTEXT, or the
    shortest context asked for with --contexts when that is shorter."""
    return min([WEIGHT_ONLY_CONTEXT, *(args.contexts or [])])


def _weight_only_fp8(tmp: str, args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator, steps: int,
                     trials: int) -> dict:
    """Decode speed of FP8 weights dequantized per GEMM (weights="fp8", what "auto" runs on a CPU)
    vs the same checkpoint dequantized at load (weights="bf16"), same run, batch 1."""
    path = make_tiny_checkpoint(os.path.join(tmp, "fp8"), args.config, fp8=True, seed=args.seed)
    fp8 = from_pretrained(path, dtype=dtype, mtp=False, attn=args.attn, weights="fp8")
    dense = from_pretrained(path, dtype=dtype, mtp=False, attn=args.attn, weights="bf16")
    ctx = _extras_context(args)
    ids = torch.randint(0, fp8.cfg.vocab_size, (1, ctx), generator=gen)
    a, b = _decode_rates([fp8, dense], ids, steps, trials)
    param_bytes = [sum(p.numel() * p.element_size() for p in m.parameters()) for m in (fp8, dense)]
    out = {"context": ctx, "batch": 1, "fp8_decode_tok_s": a, "dense_decode_tok_s": b,
           "ratio": a / b, "fp8_weight_bytes": param_bytes[0], "dense_weight_bytes": param_bytes[1]}
    print(f"weight-only FP8 decode (ctx {ctx}, B 1): {a:.1f} tok/s vs dequantized "
          f"at load {b:.1f} ({out['ratio']:.2f}x), weights {param_bytes[0] / 2**20:.0f} vs "
          f"{param_bytes[1] / 2**20:.0f} MiB", flush=True)
    return out


def _batch_invariant_cost(path: str, model, args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator,
                          steps: int, trials: int) -> dict:
    """Decode speed of the batch-invariant mode vs the default one, same weights, same run."""
    inv = from_pretrained(path, dtype=dtype, mtp=False, attn=args.attn, batch_invariant=True)
    ctx = _extras_context(args)
    out = {"context": ctx}
    for bsz in (1, 4):
        ids = torch.randint(0, model.cfg.vocab_size, (bsz, ctx), generator=gen)
        a, b = _decode_rates([inv, model], ids, steps, trials)
        out[f"batch{bsz}"] = {"invariant_decode_tok_s": a, "default_decode_tok_s": b, "slowdown": b / a}
        print(f"batch-invariant decode (ctx {ctx}, B {bsz}): {a:.1f} vs default "
              f"{b:.1f} tok/s ({b / a:.2f}x slower)", flush=True)
    return out


def _decode_step_seconds(model, cache, ctx: int, tok: torch.Tensor, steps: int) -> float:
    """Mean seconds of `steps` one-token steps at position ctx (each rewrites that slot: equal work)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        model(tok, ctx, cache)
    return (time.perf_counter() - t0) / steps


def _attention_seconds(model, cache, ctx: int, gen: torch.Generator, steps: int) -> float:
    """Mean seconds of one decode step of layer SPARSE_LAYER's attention alone (the indexer, its
    selection and the attention itself; dense: the attention), over a cache of ctx positions."""
    from deepseek_model.rope import rotary_table  # noqa: PLC0415

    attn = model.layers[SPARSE_LAYER].attn
    x = torch.randn(1, 1, model.cfg.hidden_size, generator=gen).to(model.spec.dtype)  # (1, 1, hidden)
    rotary = rotary_table(model.inv_freq, ctx, 1, model.rope_magnitude)  # (1, rope/2)
    t0 = time.perf_counter()
    for _ in range(steps):
        attn(x, ctx, rotary, None, cache.layers[SPARSE_LAYER])
    return (time.perf_counter() - t0) / steps


def _prefill_attention_seconds(model, ctx: int, gen: torch.Generator) -> float:
    """Seconds of layer SPARSE_LAYER's attention alone over a fresh ctx-token prefill chunk (its
    indexer, selection and attention; dense: the attention), from a random normed input."""
    from deepseek_model.model import causal_mask  # noqa: PLC0415
    from deepseek_model.rope import rotary_table  # noqa: PLC0415

    attn, dtype = model.layers[SPARSE_LAYER].attn, model.spec.dtype
    x = torch.randn(1, ctx, model.cfg.hidden_size, generator=gen).to(dtype)  # (1, T, hidden): unit RMS, as normed
    rotary = rotary_table(model.inv_freq, 0, ctx, model.rope_magnitude)  # (T, rope/2)
    mask = causal_mask(ctx, 0, dtype, x.device)  # (T, T)
    cache = model.new_cache().layers[SPARSE_LAYER]
    t0 = time.perf_counter()
    attn(x, 0, rotary, mask, cache)
    return time.perf_counter() - t0


def _with_index_topk(src: str, out: str, topk: int) -> str:
    """A copy of the V3.2 checkpoint `src` in `out` that differs only in config.json's index_topk (the
    other files are hard links). Returns out."""
    os.makedirs(out)
    for name in os.listdir(src):
        if name == "config.json":
            with open(os.path.join(src, name), encoding="utf-8") as f:
                config = json.load(f)
            with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                json.dump(dict(config, index_topk=topk), f, indent=2)
        else:
            os.link(os.path.join(src, name), os.path.join(out, name))
    return out


def _gather_penalty(model, ctx: int, gen: torch.Generator) -> dict:
    """The measurement behind attention.GATHER_PENALTY, at layer SPARSE_LAYER of `model`: one block of
    SPARSE_PREFILL_CHUNK queries at the end of a ctx-long context, each with index_topk random
    visible keys; seconds per gathered (query, key) pair of the absorbed path over seconds per
    (query, key) pair of the masked naive path (its kv_b expansion of the cache excluded), divided by
    the ratio of their FLOPs per pair."""
    from deepseek_model import attention  # noqa: PLC0415
    from deepseek_model.model import causal_mask  # noqa: PLC0415

    attn, dtype = model.layers[SPARSE_LAYER].attn, model.spec.dtype
    t, k = min(attention.SPARSE_PREFILL_CHUNK, ctx), attn.indexer.topk
    kv = torch.randn(1, ctx, attn.kv_lora_rank, generator=gen).to(dtype)  # (1, S, c)
    pe = torch.randn(1, ctx, attn.rope, generator=gen).to(dtype)  # (1, S, rope)
    q_nope = torch.randn(1, t, attn.n_heads, attn.nope, generator=gen).to(dtype)  # (1, T, H, nope)
    q_pe = torch.randn(1, t, attn.n_heads, attn.rope, generator=gen).to(dtype)  # (1, T, H, rope)
    selected = torch.full((1, t, k), -1, dtype=torch.int64)  # (1, T, K)
    for i in range(t):
        picked = torch.randperm(ctx - t + i + 1, generator=gen)[:k]  # visible keys of query i
        selected[0, i, :picked.numel()] = picked
    mask = causal_mask(t, ctx - t, dtype, kv.device)  # (T, S)
    gathered = _best_seconds(lambda: attn._sparse_absorbed(q_nope, q_pe, kv, pe, selected))
    masked = _best_seconds(lambda: attn._naive(q_nope, q_pe, kv, pe, mask, attention.SPARSE_PREFILL_CHUNK, selected))
    expansion = _best_seconds(lambda: attn.wkv_b(kv))
    per_pair = (gathered / (t * k)) / (max(masked - expansion, 1e-9) / (t * ctx))
    masked_flops, gathered_flops = attn.pair_flops()
    flops = gathered_flops / masked_flops  # per pair
    out = {"context": ctx, "queries": t, "index_topk": k, "time_ratio_per_pair": per_pair,
           "measured": per_pair / flops, "used": attention.GATHER_PENALTY}
    print(f"gather penalty (ctx {ctx}, top {k}): measured {out['measured']:.2f}, used {out['used']}", flush=True)
    return out


def _prefill_crossover(tmp: str, sparse_path: str, dense, args: argparse.Namespace, dtype: torch.dtype,
                       gen: torch.Generator) -> dict:
    """Whole-model prefill of the V3.2 weights with index_topk = --crossover-topk vs the same weights
    as V3, batch 1, at CROSSOVER_MULTIPLES of that index_topk: alternating trials, medians, ratios
    dense time / sparse time ("rows"); and the gather penalty measured at the longest of them."""
    topk = args.crossover_topk
    sparse = from_pretrained(_with_index_topk(sparse_path, os.path.join(tmp, f"v32-top{topk}"), topk), dtype=dtype,
                             mtp=False, attn=args.attn, cpu_pack=not args.no_cpu_pack)
    warm = torch.randint(0, dense.cfg.vocab_size, (1, WARMUP_CONTEXT), generator=gen)
    for model in (sparse, dense):  # first-call costs (stacking the experts' weights) stay out of the timings
        model.hidden(warm, 0, model.new_cache())
    rows = []
    for mult in CROSSOVER_MULTIPLES:
        ids = torch.randint(0, dense.cfg.vocab_size, (1, mult * topk), generator=gen)
        times: dict[str, list[float]] = {"sparse": [], "dense": []}
        attn: dict[str, list[float]] = {"sparse": [], "dense": []}
        for _ in range(CROSSOVER_TRIALS):
            for name, model in (("sparse", sparse), ("dense", dense)):
                t0 = time.perf_counter()
                model.head(model.hidden(ids, 0, model.new_cache())[:, -1])  # as generation prefills
                times[name].append(time.perf_counter() - t0)
                attn[name].append(_prefill_attention_seconds(model, mult * topk, gen))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        med_attn = {name: statistics.median(ts) for name, ts in attn.items()}
        row = {"context": mult * topk, "index_topk": topk, "multiple": mult, "batch": 1, "prefill_s": med,
               "prefill_ratio": med["dense"] / med["sparse"], "attention_prefill_s": med_attn,
               "attention_ratio": med_attn["dense"] / med_attn["sparse"]}
        rows.append(row)
        print(f"V3.2 prefill crossover (top {topk}, ctx {mult * topk} = {mult}x): {med['sparse']:.2f} vs "
              f"{med['dense']:.2f} s ({row['prefill_ratio']:.2f}x); one layer's attention "
              f"{med_attn['sparse']:.3f} vs {med_attn['dense']:.3f} s ({row['attention_ratio']:.2f}x)", flush=True)
    return {"rows": rows, "gather_penalty": _gather_penalty(sparse, max(CROSSOVER_MULTIPLES) * topk, gen)}


def _sparse_vs_dense(tmp: str, args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator,
                     trials: int) -> tuple[list[dict], dict]:
    """V3.2 (indexer + top-SPARSE_TOPK sparse MLA) vs the same weights as V3 (dense MLA), batch 1, per
    context (all >= 4 x index_topk): prefill once per model (the long prefills make repeats costly),
    then alternating trials of decode steps from that cache, of the whole model and of one layer's
    attention alone; medians of the trials, ratios dense time / sparse time. Returns those rows and
    the prefill crossover's (`_prefill_crossover`)."""
    contexts = _sparse_contexts(args)
    v32 = _v32_config_dict(args)
    sparse_path = make_tiny_checkpoint(os.path.join(tmp, "v32"), v32, fp8=False, seed=args.seed, mtp=False)
    dense_path = write_dense_twin(sparse_path, os.path.join(tmp, "v3"))
    pack = not args.no_cpu_pack
    models = {"sparse": from_pretrained(sparse_path, dtype=dtype, mtp=False, attn=args.attn, cpu_pack=pack),
              "dense": from_pretrained(dense_path, dtype=dtype, mtp=False, attn=args.attn, cpu_pack=pack)}
    warm = torch.randint(0, v32["vocab_size"], (1, WARMUP_CONTEXT), generator=gen)
    for model in models.values():  # first-call costs (stacking the experts' weights) stay out of the timings
        model.hidden(warm, 0, model.new_cache())
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, v32["vocab_size"], (1, ctx), generator=gen)
        tok = ids[:, :1]
        caches, prefill = {}, {}
        for name, model in models.items():
            caches[name] = model.new_cache()
            t0 = time.perf_counter()
            model.head(model.hidden(ids, 0, caches[name])[:, -1])  # as generation prefills: last logits only
            prefill[name] = time.perf_counter() - t0
            _decode_step_seconds(model, caches[name], ctx, tok, 1)  # warm-up
        step = {name: [] for name in models}
        attn = {name: [] for name in models}
        for _ in range(trials):
            for name, model in models.items():
                step[name].append(_decode_step_seconds(model, caches[name], ctx, tok, SPARSE_DECODE_STEPS))
                attn[name].append(_attention_seconds(model, caches[name], ctx, gen, SPARSE_DECODE_STEPS))
        med = {name: (statistics.median(step[name]), statistics.median(attn[name])) for name in models}
        row = {"context": ctx, "batch": 1, "index_topk": SPARSE_TOPK, "prefill_s": prefill,
               "decode_step_s": {n: m[0] for n, m in med.items()}, "attention_step_s": {n: m[1] for n, m in med.items()},
               "prefill_ratio": prefill["dense"] / prefill["sparse"],
               "decode_ratio": med["dense"][0] / med["sparse"][0], "attention_ratio": med["dense"][1] / med["sparse"][1]}
        rows.append(row)
        print(f"V3.2 sparse vs V3 dense (ctx {ctx}, top {SPARSE_TOPK}, B 1): prefill {prefill['sparse']:.1f} vs "
              f"{prefill['dense']:.1f} s ({row['prefill_ratio']:.2f}x), decode step {med['sparse'][0] * 1e3:.1f} vs "
              f"{med['dense'][0] * 1e3:.1f} ms ({row['decode_ratio']:.2f}x), one layer's attention "
              f"{med['sparse'][1] * 1e3:.2f} vs {med['dense'][1] * 1e3:.2f} ms ({row['attention_ratio']:.2f}x)",
              flush=True)
    return rows, _prefill_crossover(tmp, sparse_path, models["dense"], args, dtype, gen)


def _load_hf(path: str, dtype: torch.dtype):
    import transformers  # noqa: PLC0415 (optional peer)

    transformers.logging.set_verbosity_error()  # the MTP layer is "unexpected" to transformers: expected
    return transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _fp8_cache_error(model, gen: torch.Generator) -> dict:
    """Logit error of the fp8 latent cache against the compute-dtype cache over a decode run."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, FP8_CACHE_TOKENS), generator=gen)
    half = FP8_CACHE_TOKENS // 2
    with torch.no_grad():
        ref_c, fp8_c = model.new_cache(), model.new_cache(fp8=True)
        model(ids[:, :half], 0, ref_c)
        model(ids[:, :half], 0, fp8_c)
        err, scale, agree = 0.0, 0.0, 0
        for p in range(half, FP8_CACHE_TOKENS):
            a = model(ids[:, p:p + 1], p, ref_c)
            b = model(ids[:, p:p + 1], p, fp8_c)
            err, scale = max(err, (a - b).abs().max().item()), max(scale, a.abs().max().item())
            agree += int(a.argmax() == b.argmax())
    return {"max_abs_logit_error": err, "relative": err / scale, "argmax_agreement": agree / (FP8_CACHE_TOKENS - half),
            "bytes_per_token": fp8_c.nbytes() / fp8_c.layers[0].capacity,
            "bytes_per_token_ref": ref_c.nbytes() / ref_c.layers[0].capacity}


def _compile_check(model, prompt: list[int]) -> dict:
    """Decode under torch.compile: identical greedy tokens and the speed-up, or the error."""
    out: dict = {}
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    warnings.filterwarnings("ignore", module="torch")
    try:
        base = generate(model, [prompt], max_new_tokens=COMPILE_TOKENS, eos=[])
        base = generate(model, [prompt], max_new_tokens=COMPILE_TOKENS, eos=[])  # warm
        compiled = torch.compile(model, dynamic=True)
        t0 = time.perf_counter()
        first = generate(model, [prompt], max_new_tokens=COMPILE_TOKENS, eos=[], step_fn=compiled)
        out["compile_seconds"] = time.perf_counter() - t0
        again = generate(model, [prompt], max_new_tokens=COMPILE_TOKENS, eos=[], step_fn=compiled)
        out["identical_tokens"] = first.tokens == base.tokens == again.tokens
        out["eager_decode_tok_s"] = base.stats.new_tokens / base.stats.decode_seconds
        out["compiled_decode_tok_s"] = again.stats.new_tokens / again.stats.decode_seconds
        out["speedup"] = out["compiled_decode_tok_s"] / out["eager_decode_tok_s"]
    except Exception as e:  # noqa: BLE001 (reported, the benchmark goes on)
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        out["error"] = msg[:MAX_ERROR_CHARS]
    return out


def _table(report: dict) -> str:
    rows = report["rows"]
    lines = [f"# bench_model ({report['config']}, {report['dtype']}, {report['threads']} threads, "
             f"attn={report['attn']}; transformers: its default attention)", "",
             "| context | batch | ours prefill tok/s | hf prefill tok/s | prefill × | prefill floor ms | ours prefill / floor "
             "| ours decode tok/s | hf decode tok/s | decode × | floor step ms | ours step / floor | ours cache B/tok "
             "| hf cache B/tok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, h = r["ours"], r.get("hf") or {}

        def f(v, fmt):
            return "—" if v is None else format(v, fmt)
        lines.append(f"| {r['context']} | {r['batch']} | {o['prefill_tok_s']:.0f} | {f(h.get('prefill_tok_s'), '.0f')} "
                     f"| {f(r.get('prefill_ratio'), '.2f')} | {f(r.get('prefill_floor_s', 0) * 1e3 or None, '.1f')} "
                     f"| {f(r.get('prefill_floor_ratio'), '.2f')} | {o['decode_tok_s']:.1f} | {f(h.get('decode_tok_s'), '.1f')} "
                     f"| {f(r.get('decode_ratio'), '.2f')} | {r['floor_step_s'] * 1e3:.2f} | {r['floor_ratio']:.2f} "
                     f"| {o['cache_bytes_per_token']:.0f} | {f(h.get('cache_bytes_per_token'), '.0f')} |")
    lines += ["", "## Goals", ""]
    lines += [f"- {k}: {v}" for k, v in report["goals"].items()]
    lines += ["", "## Extras", "", f"- copy bandwidth {report['copy_bandwidth_GBps']:.1f} GB/s (read + write); "
              f"GEMM rate {report.get('gemm_GFLOPs', 0):.0f} GFLOP/s ({GEMM_SIZE}³, {report['dtype']}, the faster of "
              f"{_rates_text(report.get('gemm_GFLOPs_by_kernel', {}))}; the prefill floor is a chunk's FLOPs at this "
              f"rate); our model {'with' if report.get('cpu_pack') else 'without'} oneDNN-packed weight copies",
              f"- cache bytes/token (latent vs a per-head K/V cache): "
              f"{report['config']} {report['cache'][report['config']]}, "
              f"V3 {report['cache']['v3']}; the measured transformers column shows what that version caches "
              f"(5.x caches the compressed latent as well and re-expands it with kv_b at every step)",
              f"- fp8 latent cache: {report['fp8_cache']}", f"- torch.compile decode: {report['compile']}",
              f"- weight-only FP8 (weights=\"fp8\", dequantized per GEMM) vs dequantized at load, decode: "
              f"{report['weight_only_fp8']}",
              f"- batch-invariant mode vs default, decode: {report['batch_invariant']}",
              f"- CPU: {report.get('cpu')}",
              *([f"- bfloat16 vs float32 prefill, same weights, both ours: {report['bf16_vs_fp32_prefill']}"]
                if "bf16_vs_fp32_prefill" in report else []),
              *_sparse_lines(report),
              f"- same weights check (logits max diff vs transformers): {report.get('hf_logit_max_diff')}"]
    return "\n".join(lines) + "\n"


def _sparse_lines(report: dict) -> list[str]:
    """The V3.2 sparse-vs-dense lines of the markdown report (none without that comparison)."""
    cross = report.get("sparse_prefill_crossover") or {}
    lines = [f"- DeepSeek-V3.2 sparse attention (index_topk {r['index_topk']}) vs the same weights as V3, context "
             f"{r['context']}, batch 1 (ratios: dense time / sparse time): prefill {r['prefill_s']['sparse']:.1f} vs "
             f"{r['prefill_s']['dense']:.1f} s ({r['prefill_ratio']:.2f}x), decode step "
             f"{r['decode_step_s']['sparse'] * 1e3:.1f} vs {r['decode_step_s']['dense'] * 1e3:.1f} ms "
             f"({r['decode_ratio']:.2f}x), one layer's attention {r['attention_step_s']['sparse'] * 1e3:.2f} vs "
             f"{r['attention_step_s']['dense'] * 1e3:.2f} ms ({r['attention_ratio']:.2f}x)"
             for r in report.get("sparse_attention", [])]
    lines += [f"- V3.2 prefill crossover (index_topk {r['index_topk']}, context {r['context']} = {r['multiple']} x "
              f"index_topk, batch 1): {r['prefill_s']['sparse']:.2f} vs {r['prefill_s']['dense']:.2f} s "
              f"({r['prefill_ratio']:.2f}x)"
              + (f"; one layer's attention over the chunk {r['attention_prefill_s']['sparse']:.3f} vs "
                 f"{r['attention_prefill_s']['dense']:.3f} s ({r['attention_ratio']:.2f}x)" if "attention_ratio" in r else "")
              for r in cross.get("rows", [])]
    if "gather_penalty" in cross:
        lines.append(f"- gather penalty (the cost ratio behind auto's masked / gathered split, per pair and FLOP): "
                     f"{cross['gather_penalty']}")
    return lines


def _sparse_goals(report: dict) -> dict:
    """Goal "sparse faster than dense" (ratio > 1) per V3.2 measurement: met / NOT met; "not
    applicable" where the context holds at most index_topk tokens (every key is selected, the
    layer runs the dense computation)."""
    def verdict(ratio: float, ctx: int, topk: int) -> str:
        if ctx <= topk:
            return f"{ratio:.2f}× (not applicable: context ≤ index_topk, nothing is left out)"
        return f"{ratio:.2f}× ({'met' if ratio > 1 else 'NOT met'})"
    goals = {}
    for r in report.get("sparse_attention", []):
        ctx, topk = r["context"], r["index_topk"]
        where = f"context {ctx} = {ctx / topk:.3g} x index_topk {topk}"
        goals[f"V3.2 decode step faster than dense, {where}"] = verdict(r["decode_ratio"], ctx, topk)
        goals[f"V3.2 decode attention faster than dense, {where}"] = verdict(r["attention_ratio"], ctx, topk)
        goals[f"V3.2 prefill faster than dense, {where}"] = verdict(r["prefill_ratio"], ctx, topk)
    for r in (report.get("sparse_prefill_crossover") or {}).get("rows", []):
        ctx, topk = r["context"], r["index_topk"]
        where = f"context {ctx} = {r['multiple']} x index_topk {topk}"
        goals[f"V3.2 crossover prefill faster than dense, {where}"] = verdict(r["prefill_ratio"], ctx, topk)
        if "attention_ratio" in r:
            goals[f"V3.2 crossover prefill attention faster than dense, {where}"] = \
                verdict(r["attention_ratio"], ctx, topk)
    return goals


def _sparse_table(report: dict) -> str:
    """The markdown report of a --sparse-only run."""
    lines = [f"# bench_model --sparse-only ({report['config']} config with a lightning indexer, {report['dtype']}, "
             f"{_threads_text(report['threads'])}, attn={report['attn']})", "",
             "## Goals", ""]
    lines += [f"- {k}: {v}" for k, v in report["goals"].items()]
    lines += ["", "## Measurements", "", *_sparse_lines(report), f"- CPU: {report.get('cpu')}"]
    return "\n".join(lines) + "\n"


def _sparse_plot(report: dict, path: Path) -> bool:
    """Plot the V3.2 prefill ratios (dense time / sparse time) against context / index_topk; False
    when matplotlib is missing."""
    plt = plotting.pyplot(str(path))
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    cross = (report.get("sparse_prefill_crossover") or {}).get("rows", [])
    if cross:
        mult = [r["multiple"] for r in cross]
        ax.plot(mult, [r["prefill_ratio"] for r in cross], "o-",
                label=f"whole-model prefill, index_topk {cross[0]['index_topk']}")
        if all("attention_ratio" in r for r in cross):
            ax.plot(mult, [r["attention_ratio"] for r in cross], "s--", label="one layer's attention, prefill")
    for r in report.get("sparse_attention", []):
        m = r["context"] / r["index_topk"]
        ax.plot([m], [r["prefill_ratio"]], "^", label=f"whole-model prefill, index_topk {r['index_topk']}")
        ax.plot([m], [r["decode_ratio"]], "v", label=f"decode step, index_topk {r['index_topk']}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context / index_topk")
    ax.set_ylabel("dense time / sparse time")
    ax.set_title(f"DeepSeek-V3.2 sparse vs dense ({report['dtype']}, {_threads_text(report['threads'])}, CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot(report: dict, path: Path) -> bool:
    """Write the plot; False when matplotlib is missing."""
    plt = plotting.pyplot(str(path))
    if plt is None:
        return False

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "prefill_tok_s", "prefill tokens/s"), (axes[1], "decode_tok_s", "decode tokens/s")):
        for bsz in sorted({r["batch"] for r in report["rows"]}):
            rows = [r for r in report["rows"] if r["batch"] == bsz]
            ctx = [r["context"] for r in rows]
            ax.plot(ctx, [r["ours"][key] for r in rows], "o-", label=f"deepseek_model B={bsz}")
            if all(r.get("hf") for r in rows):
                ax.plot(ctx, [r["hf"][key] for r in rows], "s--", label=f"transformers B={bsz}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['config']} config, {report['dtype']}, {report['threads']} threads (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _goals(rows: list[dict]) -> dict:
    at_goal = [r for r in rows if r["context"] == GOAL_CONTEXT] or rows
    goals = {}
    dec = [r["decode_ratio"] for r in at_goal if r.get("decode_ratio")]
    pre = [r["prefill_ratio"] for r in rows if r.get("prefill_ratio")]
    flo = [r["floor_ratio"] for r in at_goal if r["batch"] == 1]
    if dec:
        goals["decode ≥ 2× transformers at 1k"] = f"min {min(dec):.2f}× ({'met' if min(dec) >= GOAL_DECODE else 'NOT met'})"
    if pre:
        goals["prefill ≥ 1.2× transformers"] = f"min {min(pre):.2f}× ({'met' if min(pre) >= GOAL_PREFILL else 'NOT met'})"
    if flo:
        goals["decode within 3× of the weight-streaming floor (B=1, 1k)"] = \
            f"{max(flo):.2f}× ({'met' if max(flo) <= GOAL_FLOOR else 'NOT met'})"
        goals[f"1k batch-1 decode step ≤ {GOAL_DECODE_FLOOR_1K}× its floor"] = \
            f"{max(flo):.2f}× ({'met' if max(flo) <= GOAL_DECODE_FLOOR_1K else 'NOT met'})"
    short = []  # cells neither >= 1.5x transformers nor within 1.2x of their floor
    for r in rows:
        for kind, ratio, floor in (("prefill", r.get("prefill_ratio"), r.get("prefill_floor_ratio")),
                                   ("decode", r.get("decode_ratio"), r.get("floor_ratio"))):
            if ratio is not None and ratio < GOAL_CELL_RATIO and (floor is None or floor > GOAL_CELL_FLOOR):
                short.append(f"{kind} {r['context']}/B{r['batch']} ({ratio:.2f}×, {floor:.2f}× floor)")
    if any(r.get("prefill_ratio") for r in rows):
        goals[f"every cell ≥ {GOAL_CELL_RATIO}× transformers or within {GOAL_CELL_FLOOR}× its floor"] = \
            "met" if not short else "NOT met: " + "; ".join(short)
    return goals


def _write(report: dict, out_dir: Path, json_path: str | None, table: str, plot) -> None:
    """Write results.json, results.md and results.png (when matplotlib is there) into out_dir, and the
    JSON also to json_path when given."""
    wrote = results_io.write_run(out_dir, json_path, json.dumps(report, indent=2), table,
                                 lambda path: plot(report, path))
    print("wrote " + ", ".join(str(path) for path in wrote))


def _report_head(args: argparse.Namespace) -> dict:
    """What every report records first: the run's settings, versions and the CPU's features."""
    return {"config": args.config, "dtype": args.dtype, "threads": torch.get_num_threads(), "quick": args.quick,
            "attn": args.attn, "cpu_pack": not args.no_cpu_pack,
            "versions": {"torch": torch.__version__, "python": platform.python_version(),
                         "platform": platform.platform()},
            "cpu": cpu_features()}


def _threads_text(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def _sparse_only(args: argparse.Namespace, dtype: torch.dtype, gen: torch.Generator, trials: int,
                 out_dir: Path) -> int:
    """--sparse-only: the V3.2 sparse-vs-dense comparison and its goals, written as the full run's are."""
    report = _report_head(args)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp, torch.inference_mode():
        report["sparse_attention"], report["sparse_prefill_crossover"] = _sparse_vs_dense(tmp, args, dtype, gen, trials)
    report["goals"] = _sparse_goals(report)
    for k, v in report["goals"].items():
        print(f"goal: {k}: {v}")
    _write(report, out_dir, args.json, _sparse_table(report), _sparse_plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 (goals are reported, not enforced)."""
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else CONTEXTS)
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    steps = QUICK_DECODE_STEPS if args.quick else DECODE_STEPS
    trials = QUICK_TRIALS if args.quick else TRIALS
    gen = torch.Generator().manual_seed(args.seed)
    out_dir = Path(args.out)  # made when the results are written: a failed run leaves no empty one
    if args.sparse_only:
        return _sparse_only(args, dtype, gen, trials, out_dir)
    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        t0 = time.perf_counter()
        path = make_tiny_checkpoint(tmp, args.config, fp8=False, seed=args.seed)
        ours_model = from_pretrained(path, dtype=dtype, mtp=False, attn=args.attn, cpu_pack=not args.no_cpu_pack)
        cfg = ours_model.cfg
        print(f"built and loaded the {args.config} checkpoint in {time.perf_counter() - t0:.1f} s; {threads} threads, "
              f"{args.dtype}")
        hf_model, hf_error = None, None
        if not args.no_hf:
            try:
                hf_model = _load_hf(path, dtype)
            except Exception as e:  # noqa: BLE001
                hf_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:MAX_ERROR_CHARS]
                print(f"transformers unavailable: {hf_error}")
        report = dict(_report_head(args), hf_error=hf_error)
        with torch.inference_mode():
            if hf_model is not None:
                probe = torch.randint(0, cfg.vocab_size, (1, 32), generator=gen)
                report["hf_logit_max_diff"] = (ours_model(probe) - hf_model(probe).logits.float()).abs().max().item()
                import transformers  # noqa: PLC0415

                report["versions"]["transformers"] = transformers.__version__
            bw = copy_bandwidth()
            report["copy_bandwidth_GBps"] = bw / 1e9
            rates = gemm_rates(dtype)
            rate = max(rates.values())  # the floor takes the faster GEMM: no kernel the model runs beats it
            report["gemm_GFLOPs"] = rate / 1e9
            report["gemm_GFLOPs_by_kernel"] = {k: v / 1e9 for k, v in rates.items()}
            esize = torch.empty((), dtype=dtype).element_size()
            w_bytes = active_weight_bytes(cfg, esize)
            report["active_weight_bytes_per_token"] = w_bytes
            warm = torch.randint(0, cfg.vocab_size, (max(batches), WARMUP_CONTEXT), generator=gen)
            for runner in [_Ours(ours_model)] + ([_HF(hf_model)] if hf_model is not None else []):
                _one_trial(runner, warm, 2)  # first-call costs (allocator, oneDNN primitives) stay out of the table
            rows = []
            for ctx in contexts:
                for bsz in batches:
                    ids = torch.randint(0, cfg.vocab_size, (bsz, ctx), generator=gen)
                    runners = [_Ours(ours_model)] + ([_HF(hf_model)] if hf_model is not None else [])
                    results = _measure(runners, ids, steps, trials)
                    row = {"context": ctx, "batch": bsz, "ours": results[0]}
                    if hf_model is not None:
                        row["hf"] = results[1]
                        row["prefill_ratio"] = row["ours"]["prefill_tok_s"] / row["hf"]["prefill_tok_s"]
                        row["decode_ratio"] = row["ours"]["decode_tok_s"] / row["hf"]["decode_tok_s"]
                    # floor of one decode step: weights once (batch 1 set; a lower bound for batch 8)
                    # plus the latent cache read once per row
                    cache_read = bsz * ctx * cfg.latent_dim * esize * cfg.num_hidden_layers
                    row["floor_step_s"] = (w_bytes + cache_read) / bw
                    row["floor_ratio"] = row["ours"]["decode_step_s"] / row["floor_step_s"]
                    # prefill floor: the FLOPs of the chunk at the GEMM rate measured above
                    row["prefill_floor_s"] = bsz * ctx * prefill_flops_per_token(cfg, ctx) / rate
                    row["prefill_floor_ratio"] = bsz * ctx / row["ours"]["prefill_tok_s"] / row["prefill_floor_s"]
                    rows.append(row)
                    hf = row.get("hf")
                    print(f"ctx {ctx:5d} B {bsz}: prefill ours {row['ours']['prefill_tok_s']:8.0f} tok/s"
                          + (f" hf {hf['prefill_tok_s']:8.0f} ({row['prefill_ratio']:.2f}x)" if hf else "")
                          + f" | decode ours {row['ours']['decode_tok_s']:7.1f} tok/s"
                          + (f" hf {hf['decode_tok_s']:7.1f} ({row['decode_ratio']:.2f}x)" if hf else "")
                          + f" | step/floor {row['floor_ratio']:.2f} prefill/floor {row['prefill_floor_ratio']:.2f}",
                          flush=True)
            report["rows"] = rows
            report["goals"] = _goals(rows)
            v3 = ModelConfig.builtin(V3_CONFIG)
            model_c, v3_c = cache_bytes_per_token(cfg, esize), cache_bytes_per_token(v3, 2)
            report["cache"] = {args.config: {k: round(v, 2) for k, v in model_c.items()},
                               "v3": {k: round(v, 2) for k, v in v3_c.items()}}
            report["fp8_cache"] = _fp8_cache_error(ours_model, gen)
            report["weight_only_fp8"] = _weight_only_fp8(tmp, args, dtype, gen, steps, trials)
            report["batch_invariant"] = _batch_invariant_cost(path, ours_model, args, dtype, gen, steps, trials)
            if dtype == torch.bfloat16:
                goal_ctx = GOAL_CONTEXT if GOAL_CONTEXT in contexts else max(contexts)
                bf = report["bf16_vs_fp32_prefill"] = _bf16_vs_fp32_prefill(
                    path, ours_model, args, goal_ctx, gen, trials, report["cpu"].get("amx"))
                report["goals"][f"bf16 prefill ≥ {GOAL_BF16_PREFILL}× float32 at {goal_ctx} where the CPU has AMX"] = \
                    _bf16_goal(bf)
            report["sparse_attention"], report["sparse_prefill_crossover"] = \
                ([], {}) if args.no_sparse else _sparse_vs_dense(tmp, args, dtype, gen, trials)
            report["goals"].update(_sparse_goals(report))
        report["compile"] = {"skipped": True} if args.no_compile else _compile_check(ours_model, list(range(1, 65)))
    for k, v in report["goals"].items():
        print(f"goal: {k}: {v}")
    print(f"cache bytes/token: {args.config} latent {model_c['latent']} vs per-head {model_c['per_head_kv']} "
          f"({model_c['ratio']:.1f}x); V3 {v3_c['latent']} vs {v3_c['per_head_kv']} ({v3_c['ratio']:.1f}x)")
    print(f"fp8 latent cache: {report['fp8_cache']}")
    print(f"torch.compile decode: {report['compile']}")
    _write(report, out_dir, args.json, _table(report), _plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
