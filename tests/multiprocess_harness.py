"""Run a function on N real processes joined by a gloo process group on 127.0.0.1.

Each worker gets the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT),
builds its context with `deepseek_model.parallel.init` (collectives time out), runs
`fn(ctx, *args)` and saves the result; an exception is written to a file and ends the process with
a non-zero exit code. Every join has a deadline, so a hung job fails the test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch

LOOPBACK = "127.0.0.1"
JOIN_TIMEOUT_S = 120.0  # whole job; far above the few seconds a tiny model needs
COLLECTIVE_TIMEOUT_S = 20.0
WORKER_THREADS = 1  # 2 cores shared by all ranks
# Workers fork from one server process that imported these once (spawning a fresh interpreter per
# rank re-imports torch every time); the server never runs torch ops, so forking it is safe.
PRELOAD = ("torch", "torch.distributed", "deepseek_model", "deepseek_model.loading")
EXIT_FAILED = 1


@dataclass
class RankOutcome:
    """What one rank did: its exit code (None: killed at the deadline), result and error line."""

    exitcode: int | None
    result: Any = None
    error: str | None = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one local rank (single node, loopback rendezvous)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
            "GLOO_SOCKET_IFNAME": "lo"}


def _entry(fn: Callable, rank: int, world_size: int, port: int, out_dir: str, timeout_s: float,
           args: tuple) -> None:
    from deepseek_model import parallel

    os.environ.update(torchrun_env(rank, world_size, port))
    torch.set_num_threads(WORKER_THREADS)
    ctx = parallel.init(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        result = fn(ctx, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException as e:  # report, then exit non-zero
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w", encoding="utf-8") as f:
            f.write(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        os._exit(EXIT_FAILED)  # no interpreter teardown that could wait on peers
    parallel.shutdown(ctx)


def run_workers(fn: Callable, world_size: int, *args: Any, timeout_s: float = JOIN_TIMEOUT_S,
                collective_timeout_s: float = COLLECTIVE_TIMEOUT_S) -> list[RankOutcome]:
    """Run `fn(ctx, *args)` on `world_size` worker processes; return every rank's outcome.

    Args:
        fn: a module-level function (pickled by name into the worker processes).
        world_size: number of ranks.
        args: picklable arguments.
        timeout_s: deadline for the whole job; ranks still running then are killed.
        collective_timeout_s: the process group's collective timeout.
    """
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(list(PRELOAD))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="dsm-parallel-") as out_dir:
        procs = [mp.Process(target=_entry, args=(fn, r, world_size, port, out_dir, collective_timeout_s, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        outcomes = []
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                outcomes.append(RankOutcome(None, error=f"rank {rank} still running after {timeout_s:.0f} s"))
                continue
            res_path, err_path = os.path.join(out_dir, f"rank{rank}.pt"), os.path.join(out_dir, f"rank{rank}.err")
            result = torch.load(res_path, weights_only=True) if os.path.exists(res_path) else None
            error = open(err_path, encoding="utf-8").read() if os.path.exists(err_path) else None
            outcomes.append(RankOutcome(p.exitcode, result, error))
    return outcomes


def results(outcomes: list[RankOutcome]) -> list[Any]:
    """Every rank's result, asserting that all ranks succeeded (their errors in the message)."""
    bad = [f"rank {r}: exit {o.exitcode}: {o.error}" for r, o in enumerate(outcomes) if o.exitcode != 0]
    assert not bad, "\n".join(bad)
    return [o.result for o in outcomes]

