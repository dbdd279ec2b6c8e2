"""Staged transfers of scattered KV blocks. A pool that has served a while hands out
blocks in no particular order, so a prompt's blocks are about one run each, and a
transfer that moves each run on its own pays a fixed cost per run: on two H200s an NCCL
send/recv per 2 MiB block reached 36% of one contiguous send's bandwidth, a NIXL
descriptor per block 51% (benchmarks/results/gpu_transfer_h200x2.json).

Staged, the sender gathers the blocks into a contiguous staging buffer (one kernel,
kernels/block_copy.py: HBM moves bytes several times faster than NVLink), sends that
buffer in one operation, and the receiver scatters it into its blocks (one kernel).
Two buffers per side and chunks of at most `MAX_CHUNK_BYTES` let the gather of chunk
c+1 and the scatter of chunk c-1 overlap the send of chunk c, so a long transfer costs
about its sends plus one chunk's gather and scatter.

Both sides must cut the same chunks: `StagingPlan.chunks` depends only on the run lengths,
which are equal on both sides (`coalesce` pairs runs).

Chunks are queued from Python, ~0.1 ms of host time each, which below ~4k tokens is the
GPU's wait. Replaying one CUDA graph per chunk layout took scattered 1k tokens from 53 to
62% of a contiguous send (64-token blocks; 57 to 67% with 16-token ones) but was withdrawn
(gpu_transfer_nccl_graphs_block*_h200x2.json): NCCL's abort waits for every graph that
captured the communicator, a graph whose peer died cannot finish before that abort, and
CuPy's abort holds the GIL, so aborting such a link hung the process."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kernels.block_copy import PROGRAMS

# Runs this long on average go as they are: the per-operation cost is already small
# beside their bytes, and staging would only add the copies.
DIRECT_RUN_BYTES = 32 << 20
# Chunks: about a quarter of the transfer, so even a 1k-token prompt's KV pipelines,
# within bounds: small ones pay the per-operation cost again, big ones cost memory
# (two buffers per side of each link).
MIN_CHUNK_BYTES = 16 << 20
MAX_CHUNK_BYTES = 128 << 20
# Staging buffers per side of a link: one is filled while the other moves.
STAGING_BUFFERS = 2
# Links whose staging buffers a GPU worker's KV budget leaves room for
# (`staging_reserve_bytes`): 1 GiB in all.
STAGED_LINKS_RESERVED = 4


def staging_reserve_bytes() -> int:
    """Device memory a GPU worker's KV cache leaves free for its nccl links' staging
    buffers, made when each link joins (a worker with more peers than
    STAGED_LINKS_RESERVED takes the rest from what is free)."""
    return STAGED_LINKS_RESERVED * STAGING_BUFFERS * MAX_CHUNK_BYTES


@dataclass(frozen=True)
class StagingPlan:
    """How a link stages: both sides of a link must use the same plan (it decides the
    chunks, which are the protocol). The defaults are what serving uses; the transfer
    benchmark tries others side by side."""

    direct_run_bytes: int = DIRECT_RUN_BYTES
    min_chunk_bytes: int = MIN_CHUNK_BYTES
    max_chunk_bytes: int = MAX_CHUNK_BYTES
    pieces: int = 4  # a transfer is cut into about this many chunks, within the bounds
    copy_programs: int = PROGRAMS  # of the gather and scatter kernels
    # "triton": kernels/block_copy.py on `copy_programs` programs; "torch": index_select
    # and index_copy_ (every SM, and a C++ launch instead of Triton's Python one)
    copy_kernel: str = "triton"
    # The first gather and the last scatter on every SM (torch's ops): they overlap no
    # NCCL operation of the transfer, so a narrow grid there only lengthens it
    wide_edges: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.min_chunk_bytes <= self.max_chunk_bytes or self.pieces < 1 or \
                self.copy_kernel not in ("triton", "torch") or self.copy_programs < 1 or \
                self.direct_run_bytes < 1:
            raise ValueError(f"bad staging plan {self}")

    def chunks(self, counts: Sequence[int], block_bytes: int) -> list[tuple[int, int]] | None:
        """The chunks [lo, hi) of the transfer's blocks, in transfer order, for runs of
        `counts` blocks; None when the runs should move as they are."""
        total = sum(counts)
        if len(counts) <= 1 or total * block_bytes >= len(counts) * self.direct_run_bytes:
            return None
        chunk_bytes = min(max(total * block_bytes // self.pieces, self.min_chunk_bytes),
                          self.max_chunk_bytes)
        per = min(max(1, chunk_bytes // block_bytes), self.max_chunk_blocks(block_bytes))
        return [(lo, min(lo + per, total)) for lo in range(0, total, per)]

    def max_chunk_blocks(self, block_bytes: int) -> int:
        """The most blocks a chunk holds: what one staging buffer is sized for."""
        return max(1, self.max_chunk_bytes // block_bytes)


DEFAULT_PLAN = StagingPlan()


def block_order(runs: Sequence[tuple[int, int]]) -> np.ndarray:
    """The block ids of (first, count) runs, in transfer order (int64). Vectorized: a
    scattered 64k-token transfer has 4096 runs, and building its ids one run at a time
    (a torch.arange each) took longer on the host than its sends take on NVLink."""
    if not runs:
        return np.zeros(0, dtype=np.int64)
    table = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    starts, counts = table[:, 0], table[:, 1]
    firsts = np.cumsum(counts) - counts  # where each run begins in the transfer
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(starts - firsts, counts)


def as_block_rows(kv_cache: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """The KV tensor as [num_blocks, block_bytes / 8] int64 rows: gathers and scatters
    move 8 bytes per element instead of one."""
    if block_bytes % 8:
        raise ValueError(f"blocks of {block_bytes} bytes are not whole 8-byte words")
    # view, never reshape: a copy would take the transfer's writes
    return kv_cache.view(torch.uint8).view(-1, block_bytes).view(torch.int64)
