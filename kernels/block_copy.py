"""Gather KV blocks into a contiguous buffer and scatter them back: the copies of a
staged transfer (kvtransfer/transfer/staging.py).

torch's index_select / index_copy_ copy as fast (1.9 TB/s on the H200,
gpu_staging_h200x2.json) but launch a grid over every SM; these copies run beside the
engine's own kernels on the same GPU while a transfer is in flight, so here a fixed
number of programs stride over the blocks, TILE words at a time, wide and contiguous.
Rows are int64 words (`staging.as_block_rows`). The CPU test runs the same source in
Triton's interpreter; without Triton the torch ops are used.
"""

from __future__ import annotations

import functools
import os

import torch

from kernels.attention.rope_kv_write import triton_unavailable_reason

TILE = 4096  # int64 words (32 KiB) per loop iteration of a program
# A fixed, small grid whose programs stride over the tiles: the copies run while the
# engine computes on the same GPU, and need not take every SM to outrun NVLink. 32
# programs gather at 0.9 TB/s on the H200 (a full grid 1.9 TB/s), and a staged 64k-token
# transfer with them took 26.6 ms against 24.6 ms for its sends alone
# (gpu_staging_h200x2.json).
PROGRAMS = 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_rows(src_ptr, ids_ptr, dst_ptr, n, words, tiles, GATHER: tl.constexpr,
                  TILE: tl.constexpr, PROGRAMS: tl.constexpr):
        # Row i of the buffer is row ids[i] of the blocks: read there (gather) or
        # written there (scatter).
        for t in range(tl.program_id(0), n * tiles, PROGRAMS):
            i = t // tiles
            offs = (t % tiles) * TILE + tl.arange(0, TILE)
            keep = offs < words
            in_buffer = i.to(tl.int64) * words + offs
            in_blocks = tl.load(ids_ptr + i) * words + offs
            if GATHER:
                tl.store(dst_ptr + in_buffer, tl.load(src_ptr + in_blocks, mask=keep),
                         mask=keep)
            else:
                tl.store(dst_ptr + in_blocks, tl.load(src_ptr + in_buffer, mask=keep),
                         mask=keep)

    return copy_rows


def _use_triton(t: torch.Tensor) -> bool:
    return triton_unavailable_reason() is None and (
        t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _check(rows: torch.Tensor, ids: torch.Tensor, buf: torch.Tensor) -> None:
    if rows.dim() != 2 or buf.dim() != 2 or rows.shape[1] != buf.shape[1]:
        raise ValueError(f"rows {tuple(rows.shape)} and buffer {tuple(buf.shape)} must be "
                         "[n, words] with equal words")
    if not (rows.is_contiguous() and buf.is_contiguous() and ids.is_contiguous()):
        raise ValueError("rows, ids and buffer must be contiguous")
    if ids.dtype != torch.int64 or len(ids) != len(buf):
        raise ValueError("ids must be int64, one per buffer row")


def _launch(gather: bool, src: torch.Tensor, ids: torch.Tensor, dst: torch.Tensor,
            programs: int) -> None:
    words = src.shape[1]
    tiles = (words + TILE - 1) // TILE
    # The stride stays `programs` (one compiled kernel per count); a smaller transfer
    # launches only as many programs as it has tiles, each of which then copies one.
    grid = min(programs, len(ids) * tiles)
    _kernel()[(grid,)](src, ids, dst, len(ids), words, tiles, GATHER=gather, TILE=TILE,
                       PROGRAMS=programs)


def gather_rows(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor,
                programs: int | None = None) -> None:
    """out[i] = rows[ids[i]], on the current stream, by `programs` programs (PROGRAMS)."""
    _check(rows, ids, out)
    if not len(ids):
        return
    if not _use_triton(rows):
        torch.index_select(rows, 0, ids, out=out)
        return
    _launch(True, rows, ids, out, programs or PROGRAMS)


def scatter_rows(buf: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor,
                 programs: int | None = None) -> None:
    """rows[ids[i]] = buf[i], on the current stream (ids distinct)."""
    _check(rows, ids, buf)
    if not len(ids):
        return
    if not _use_triton(rows):
        rows.index_copy_(0, ids, buf)
        return
    _launch(False, buf, ids, rows, programs or PROGRAMS)
