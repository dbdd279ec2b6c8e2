"""Tensor-parallel placement of one rank, passed explicitly to every parallel layer.

No global process-group state: a layer knows its rank and world size because it
was built with them, so a single process can build (and test) any rank's shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")

    def shard(self, total: int, what: str) -> int:
        if total % self.tp_size:
            raise ValueError(f"{what}={total} is not divisible by --tp {self.tp_size}")
        return total // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)
