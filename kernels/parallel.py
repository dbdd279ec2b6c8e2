"""Tensor-parallel placement of one rank, passed explicitly to every parallel layer.

No global process-group state: a layer knows its rank and world size because it
was built with them, so a single process can build (and test) any rank's shard.
Collectives go through `comm` when the group has one (CUDA ranks with CuPy: an NCCL
communicator on the current stream, capturable in CUDA graphs; kernels/tp_comm.py), else
through torch.distributed's default group (gloo on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from kernels.tp_comm import NcclComm


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    comm: NcclComm | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} outside tp_size {self.tp_size}")

    def shard(self, total: int, what: str) -> int:
        if total % self.tp_size:
            raise ValueError(f"{what}={total} is not divisible by --tp {self.tp_size}")
        return total // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        if self.comm is not None:
            return self.comm.all_reduce(x)
        dist.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return x
        if self.comm is not None:
            parts = self.comm.all_gather(x).unbind(0)
        else:
            parts = [torch.empty_like(x) for _ in range(self.tp_size)]
            dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)
