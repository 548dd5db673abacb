"""Generation under tensor/expert parallelism: dsm.generate on 2 ranks, and the CLI under torchrun.

Every rank holds the same full-vocabulary logits (gathered) and seeds its samplers alike, so all
ranks pick the same tokens; greedy, sampled and MTP-speculative generation equal one process.
"""

import os
import subprocess
import sys

from deepseek_model import cli
from deepseek_model.testing import one_thread
from multiprocess_harness import free_port, results, run_workers, torchrun_env
from parallel_workers import GEN_CASES, generate_all

TORCHRUN_TIMEOUT_S = 180
CLI_ARGS = ["generate", "--token-ids", "3", "17", "42", "7", "--max-new-tokens", "6", "--temperature", "0.8",
            "--seed", "5"]


def test_generation_matches_single_process(tiny_bf16):
    (ref,) = results(run_workers(generate_all, 1, tiny_bf16))
    ranks = results(run_workers(generate_all, 2, tiny_bf16))
    for case in GEN_CASES:
        assert ranks[1][case] == ranks[0][case], f"{case}: ranks sampled different tokens"
        assert ranks[0][case] == ref[case], f"{case}: 2 ranks differ from 1 process"


def test_cli_generate_under_torchrun(tiny_bf16, capsys):
    """`torchrun --nproc-per-node 2 -m deepseek_model.cli generate` prints once, the 1-process tokens."""
    with one_thread():
        assert cli.main([CLI_ARGS[0], tiny_bf16, *CLI_ARGS[1:]]) == 0
    want = capsys.readouterr().out
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in torchrun_env(0, 1, port)}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "deepseek_model.cli", CLI_ARGS[0], tiny_bf16, *CLI_ARGS[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=TORCHRUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == want and len(want.splitlines()) == 1, (proc.stdout, want)
