"""RL benchmark: the arithmetic GRPO recipe and its shuffled-reward control, pass@1 before and after.

Runs `deepseek_model.recipes.arithmetic.run_recipe` twice from the same seed: the real run (rule
rewards) and the control (the same rewards permuted within each batch, so the reward no longer says
which output was right). Both start from the same supervised checkpoint (the pretraining is seeded
identically), so their "before" figures are equal; only the "after" can differ. Writes
benchmarks/results/rl-arithmetic.json (both logs' summaries and curves), .md (the table) and .png
(held-out pass@1 and reward per step of both runs; needs matplotlib).

    deepseek-model bench rl --threads 1 --work /tmp/rl-bench
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import time
from typing import Any

import torch

from deepseek_model import plotting
from deepseek_model.benchmarks import results_io
from deepseek_model.commands.parser import Parser
from deepseek_model.recipes.arithmetic import LOG_FILE, STATE_FILE, Recipe, run_recipe

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
NAME = "rl-arithmetic"


def summary(log: dict[str, Any]) -> dict[str, Any]:
    """The figures of one run (pass@1 in %, times in seconds, per-step curves)."""
    hist = [r for r in log["history"] if "skipped" not in r]
    return {"control": log["recipe"]["control"], "completed": log["completed"], "seconds": log["seconds"],
            "pass_at_1_before": 100 * log["pass_at_1_before"], "pass_at_1_after": 100 * log["pass_at_1_after"],
            "gain_points": 100 * (log["pass_at_1_after"] - log["pass_at_1_before"]),
            "held_out": log["held_out"], "skipped_steps": len(log["skipped_steps"]),
            "evals": log["evals"],
            "curves": {k: [r[k] for r in hist] for k in ("reward", "accuracy", "format", "kl", "response_length",
                                                        "clip_fraction")}}


def write_markdown(path: str, recipe: Recipe, runs: dict[str, dict[str, Any]], threads: int) -> None:
    """The before/after table."""
    lines = [f"# {NAME}: GRPO on held-out additions", "",
             f"Command: `python -m benchmarks.bench_rl --threads {threads}` ({threads} thread(s), "
             f"{platform.machine()}, torch {torch.__version__}); recipe: {recipe.digits}-digit additions, "
             f"{recipe.pretrain_steps} supervised steps, {recipe.grpo_steps} GRPO steps of "
             f"{recipe.prompts_per_step} prompts × G = {recipe.group_size} (μ = {recipe.inner_steps}, "
             f"lr {recipe.lr:g}, ε = {recipe.clip_eps:g}, β = {recipe.kl_coef:g}, τ = {recipe.temperature:g}), "
             f"seed {recipe.seed}.", "",
             "| run | held-out greedy pass@1 before | after | change (points) | range during GRPO | "
             "response length, first → last step | wall time (pretraining + GRPO) |",
             "|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        during = [100 * e["pass_at_1"] for e in s["evals"][1:]]
        length = s["curves"]["response_length"]
        lines.append(f"| {name} | {s['pass_at_1_before']:.1f} % | {s['pass_at_1_after']:.1f} % | "
                     f"{s['gain_points']:+.1f} | {min(during):.1f}–{max(during):.1f} % | "
                     f"{length[0]:.1f} → {length[-1]:.1f} tokens | {s['seconds'] / 60:.1f} min |")
    lines += ["", f"{runs['GRPO']['held_out']} held-out problems (pairs never trained on), greedy decoding, "
              "accuracy of the `<answer>`, evaluated every "
              f"{recipe.eval_every} GRPO steps. The control permutes the rewards within each batch. The "
              f"supervised data show the column sums in {100 * recipe.reasoning_fraction:.0f} % of the examples "
              "and bare answers in the others; the pretrained model mostly answers directly when greedy (often "
              "wrongly) and is right far more often when it writes the sums: GRPO learns from the rewards to write "
              "them (the response length rises), the control does not."]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def plot(path: str, runs: dict[str, dict[str, Any]]) -> bool:
    """pass@1 and mean reward per step of both runs (False without matplotlib)."""
    plt = plotting.pyplot(path)
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for name, s in runs.items():
        axes[0].plot([e["step"] for e in s["evals"]], [100 * e["pass_at_1"] for e in s["evals"]], "o-", ms=3,
                     label=name)
        axes[1].plot(range(1, len(s["curves"]["accuracy"]) + 1), s["curves"]["accuracy"], lw=0.7, label=name)
        axes[2].plot(range(1, len(s["curves"]["kl"]) + 1), s["curves"]["kl"], lw=0.7, label=name)
    for ax, title in zip(axes, ("held-out greedy pass@1 (%)", "sampled accuracy (training batch)",
                                "KL to reference (k3)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _check_replaceable(run_dir: str) -> None:
    """A run directory this benchmark may delete and recreate: absent, empty, or an earlier run of
    the recipe (it holds the recipe's state or log file); anything else is refused, naming --work."""
    if not os.path.lexists(run_dir):
        return
    if os.path.islink(run_dir) or not os.path.isdir(run_dir):
        raise ValueError(f"--work: {run_dir} exists and is not a run directory (remove it or choose another --work)")
    held = os.listdir(run_dir)
    if held and not {STATE_FILE, LOG_FILE} & set(held):
        raise ValueError(f"--work: {run_dir} holds files that are not an earlier run of this benchmark "
                         f"(no {STATE_FILE} or {LOG_FILE}); it is not deleted: choose another --work")


def main(argv: list[str] | None = None) -> int:
    """Run both, write the results."""
    p = Parser(prog="deepseek-model bench rl", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/rl-bench", help="run directories (replaced)")
    p.add_argument("--results", default=RESULTS)
    p.add_argument("--only", choices=("real", "control"), help="run one of the two (the report needs both)")
    p.add_argument("--render", action="store_true", help="only rewrite the .md and .png from the saved .json")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads}")
    results_io.check_outputs(p, args.results, out_flag="--results", names=())
    try:
        if not args.render:
            for name in ("real", "control"):
                _check_replaceable(os.path.join(args.work, name))
    except ValueError as e:
        p.error(str(e))
    base = os.path.join(args.results, NAME)
    if args.render:
        with open(base + ".json", encoding="utf-8") as f:
            saved = json.load(f)
        write_markdown(base + ".md", Recipe(**saved["recipe"]), saved["runs"], saved["threads"])
        plot(base + ".png", saved["runs"])
        print(f"wrote {base}.md")
        return 0
    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed)
    runs = {}
    for name, control in (("GRPO", None), ("shuffled-reward control", "shuffled")):
        if args.only and (args.only == "control") != bool(control):
            continue
        out = os.path.join(args.work, "control" if control else "real")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        log = run_recipe(out, dataclasses.replace(recipe, control=control), threads=args.threads, quiet=True)
        runs[name] = summary(log)
        print(f"{name}: {runs[name]['pass_at_1_before']:.1f} % → {runs[name]['pass_at_1_after']:.1f} % "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if len(runs) < 2:
        return 0
    os.makedirs(args.results, exist_ok=True)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump({"recipe": dataclasses.asdict(recipe), "threads": args.threads, "runs": runs}, f, indent=1)
    write_markdown(base + ".md", recipe, runs, args.threads)
    if not plot(base + ".png", runs):
        print("matplotlib is not installed: no PNG (the JSON has every value)")
    print(f"wrote {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
