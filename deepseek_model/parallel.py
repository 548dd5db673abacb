"""ParallelContext: rank, world size, process group and device, passed explicitly to every parallel layer.

A single-process context (the default) makes every collective a no-op, so the same model code
serves one process and a torchrun job. `init()` builds the context from the environment torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): gloo on CPU, NCCL on GPU, with a
collective timeout so a dead or failing rank ends the job instead of hanging it.

`schema.split_problems(cfg, world_size, block)` lists every reason a config cannot be split over a world
size (heads, experts, vocab, MLP widths, and FP8 128-blocks along every split dimension); the
loader and `inspect --world-size` use it before any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from deepseek_model.checkpoint import schema

BACKEND_CPU = "gloo"
BACKEND_GPU = "nccl"
DEFAULT_TIMEOUT = timedelta(minutes=30)  # loading 671B weights can keep a rank busy for many minutes
ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK = "RANK", "WORLD_SIZE", "LOCAL_RANK"


class ParallelError(ValueError):
    """A world size the model cannot be split over, or a failure on another rank."""


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in a tensor/expert-parallel job.

    Attributes:
        rank: this process's rank in `group`.
        world_size: number of ranks sharing the model.
        group: the torch.distributed process group (None: the default group, or single process).
        device: the device this rank computes on (collective buffers live there).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelContext: rank {self.rank} is not in [0, world_size={self.world_size})")

    @property
    def is_distributed(self) -> bool:
        """True when collectives must actually communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that prints)."""
        return self.rank == 0

    def split(self, size: int, what: str) -> int:
        """The local share of `size` items split evenly across ranks.

        Raises:
            ParallelError: `size` is not divisible by the world size (names `what`).
        """
        if size % self.world_size:
            raise ParallelError(f"{what} ({size}) is not divisible by world size {self.world_size}")
        return size // self.world_size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks in place (no-op in a single process)."""
        if self.is_distributed:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `t` along `dim` (identity in a single process)."""
        if not self.is_distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def check_all(self, error: BaseException | None, what: str) -> None:
        """Collective: raise on every rank if `what` failed on any rank.

        Each rank passes its own exception (or None). A failing rank re-raises its own error; the
        others raise a ParallelError naming the failed ranks, so every process exits non-zero
        instead of waiting in the next collective.

        Raises:
            BaseException: this rank's `error`.
            ParallelError: another rank failed.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = int(error is not None)
        dist.all_reduce(flags, group=self.group)
        if error is not None:
            raise error
        failed = flags.nonzero().flatten().tolist()
        if failed:
            raise ParallelError(f"{what} failed on rank {', '.join(map(str, failed))} of {self.world_size} "
                                f"(see that rank's error)")


SINGLE_PROCESS = ParallelContext()


def launched_by_torchrun() -> bool:
    """Whether torchrun (or an equivalent launcher) set RANK and WORLD_SIZE for this process."""
    return ENV_RANK in os.environ and ENV_WORLD_SIZE in os.environ


def init(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT,
         device: str | None = None) -> ParallelContext:
    """The ParallelContext of this process, joining the torchrun job when there is one.

    Without torchrun's environment (or with WORLD_SIZE=1) no process group is created and a
    single-process context is returned. Otherwise the default process group is initialised from
    the environment (MASTER_ADDR / MASTER_PORT rendezvous) — across nodes too: run torchrun with
    `--nnodes M --node-rank i --rdzv-endpoint HOST:PORT` on every node.

    Args:
        backend: "gloo" or "nccl" (default: nccl when CUDA is available, else gloo).
        timeout: how long any collective may wait for the other ranks before failing.
        device: this rank's device (default: cuda:LOCAL_RANK with NCCL, else cpu).

    Returns:
        The context to pass to `from_pretrained(..., parallel=ctx)`.

    Raises:
        ParallelError: inconsistent environment or an unknown backend.
    """
    if backend is None:
        backend = BACKEND_GPU if torch.cuda.is_available() else BACKEND_CPU
    if backend not in (BACKEND_CPU, BACKEND_GPU):
        raise ParallelError(f"backend must be '{BACKEND_CPU}' or '{BACKEND_GPU}', got {backend!r}")
    local_rank = int(os.environ.get(ENV_LOCAL_RANK, "0"))
    if device is None:
        device = f"cuda:{local_rank}" if backend == BACKEND_GPU else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not launched_by_torchrun():
        return ParallelContext(device=device)
    try:
        rank, world_size = int(os.environ[ENV_RANK]), int(os.environ[ENV_WORLD_SIZE])
    except ValueError:
        raise ParallelError(f"{ENV_RANK}={os.environ[ENV_RANK]!r} / {ENV_WORLD_SIZE}="
                            f"{os.environ[ENV_WORLD_SIZE]!r} are not integers") from None
    if world_size == 1:
        return ParallelContext(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    return ParallelContext(rank=dist.get_rank(), world_size=dist.get_world_size(), group=None, device=device)


def shutdown(ctx: ParallelContext) -> None:
    """Destroy the default process group created by `init` (no-op in a single process)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- split validity
def check_splits(cfg: Any, world_size: int, fp8_block: int | None) -> None:
    """Raise ParallelError (one line, every reason) when `cfg` cannot be split over `world_size`."""
    problems = schema.split_problems(cfg, world_size, fp8_block)
    if problems:
        raise ParallelError(f"cannot split the model over world size {world_size}: " + "; ".join(problems))
