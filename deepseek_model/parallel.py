"""ParallelContext: rank, world size and process group, passed explicitly to every parallel layer.

A single-process context (the default) makes every collective a no-op, so the same model code
serves one process and a torchrun job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in a tensor/expert-parallel job.

    Attributes:
        rank: this process's rank in `group`.
        world_size: number of ranks sharing the model.
        group: the torch.distributed process group (None: the default group, or single process).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"ParallelContext: rank {self.rank} is not in [0, world_size={self.world_size})")

    @property
    def is_distributed(self) -> bool:
        """True when collectives must actually communicate."""
        return self.world_size > 1

    def split(self, size: int, what: str) -> int:
        """The local share of `size` items split evenly across ranks.

        Raises:
            ValueError: `size` is not divisible by the world size (names `what`).
        """
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by world size {self.world_size}")
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


SINGLE_PROCESS = ParallelContext()
