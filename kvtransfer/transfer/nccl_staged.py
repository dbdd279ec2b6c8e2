"""The staged data path of one side of an nccl link (the why is in staging.py): staging
buffers, the block ids of the transfer on the device, and the queueing of gathers, NCCL
operations and scatters on the link's two streams. Used by `NcclLink` on its own thread,
one transfer at a time."""

from __future__ import annotations

import numpy as np
import torch

from kernels.block_copy import gather_rows, scatter_rows
from kvtransfer.transfer.staging import (
    STAGING_BUFFERS,
    StagingPlan,
    block_order,
)


class LinkAborted(RuntimeError):
    """Raised between chunks when the link was aborted meanwhile."""


def _wide_gather(rows: torch.Tensor, ids: torch.Tensor, out: torch.Tensor) -> None:
    torch.index_select(rows, 0, ids, out=out)


def _wide_scatter(buf: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    rows.index_copy_(0, ids, buf)


def _copies(plan: StagingPlan):
    """(gather(rows, ids, out), scatter(buf, ids, rows)) as the plan says, for the copies
    that overlap NCCL operations."""
    if plan.copy_kernel == "torch":
        return _wide_gather, _wide_scatter
    programs = plan.copy_programs
    return (lambda rows, ids, out: gather_rows(rows, ids, out, programs),
            lambda buf, ids, rows: scatter_rows(buf, ids, rows, programs))


class StagedPath:
    """Made when the link joins, on the link's device (an allocation that fails fails the
    join, before either side has queued a transfer)."""

    def __init__(self, rows: torch.Tensor, block_bytes: int, plan: StagingPlan,
                 device: int) -> None:
        import cupy

        self.rows, self.block_bytes, self.plan, self.device = rows, block_bytes, plan, device
        most = plan.max_chunk_blocks(block_bytes)  # any transfer's chunks fit
        # Made outside the copy stream's context: torch ties a block to the stream it was
        # allocated on, and that stream is not torch's.
        self.buffers = [torch.empty(most, rows.shape[1], dtype=rows.dtype, device=rows.device)
                        for _ in range(STAGING_BUFFERS)]
        self.ids = torch.empty(rows.shape[0], dtype=torch.int64, device=rows.device)
        # Pinned, so the copy to the device is asynchronous; reused: the transfer before
        # has run out (the link waits for it) when the next one writes it. CuPy's pinned
        # memory and copy, not torch's: torch's host allocator remembers the stream of a
        # non-blocking copy and records an event on it when the buffer is freed, which
        # crashed (SIGSEGV) a process whose link was dropped after that stream had been
        # destroyed.
        self.ids_pinned = cupy.cuda.alloc_pinned_memory(rows.shape[0] * 8)
        self.ids_host = np.frombuffer(self.ids_pinned, dtype=np.int64, count=rows.shape[0])
        self.filled = [cupy.cuda.Event(disable_timing=True) for _ in range(STAGING_BUFFERS)]
        self.freed = [cupy.cuda.Event(disable_timing=True) for _ in range(STAGING_BUFFERS)]
        self.copies_done = cupy.cuda.Event(disable_timing=True)
        self.gather, self.scatter = _copies(plan)
        # The first gather and the last scatter overlap nothing of the transfer: they are
        # its critical path, so they take every SM (torch's ops, launched from C++).
        edges = (_wide_gather, _wide_scatter) if plan.wide_edges else (self.gather,
                                                                       self.scatter)
        self.first_gather, self.last_scatter = edges
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile the copy kernels for the shapes chunks take, so no transfer waits on
        Triton while its peer's NCCL operations wait on it."""
        a, b = self.buffers
        with torch.cuda.device(self.device):
            warm = torch.arange(min(len(a), 18), dtype=torch.int64, device=a.device)
            for n in (1, 2, 16):  # Triton specializes on 1 and multiples of 16, and on
                for first in (0, 1):  # 16-byte alignment of the ids (a chunk's offset)
                    ids = warm[first:first + n]
                    if len(ids) == n:
                        for gather in {self.gather, self.first_gather}:
                            gather(b, ids, a[:n])  # staging to staging only
                        for scatter in {self.scatter, self.last_scatter}:
                            scatter(a[:n], ids, b)
            torch.cuda.synchronize()

    def queue(self, comm, sending: bool, peer: int, stream, copy, copy_torch, runs,
              chunks: list[tuple[int, int]], after, is_aborted, trace) -> int:
        """Queue a staged transfer on the NCCL `stream` and the `copy` stream; returns the
        bytes it moves. Buffer b is refilled only after the operation that last used it:
        the sender's gather waits for the send of two chunks back, the receiver's receive
        for that chunk's scatter. A stream waits on an event's latest record when the wait
        is queued, so the two events per buffer are reused chunk after chunk. Ends with
        `stream` waiting for the last copy, so an event recorded on it after this marks
        the whole transfer. `sending`: this side sends (the prefill side); `peer`: the
        other side's rank. `copy_torch` is `copy` as a torch stream (made once: making
        one per transfer costs the host time the GPU then waits for)."""
        import cupy
        from cupy.cuda import nccl

        rows, last = self.rows, len(chunks) - 1
        copy.wait_event(after)
        order = block_order(runs)
        count = len(order)
        ids = self.ids[:count]

        def load_ids() -> None:
            self.ids_host[:count] = order
            cupy.cuda.runtime.memcpyAsync(ids.data_ptr(), self.ids_pinned.ptr, count * 8,
                                          cupy.cuda.runtime.memcpyHostToDevice, copy.ptr)
            trace.host_mark("ids")

        if sending:
            load_ids()  # the first gather needs them; the receiver's first receive does not
        # inference_mode: the in-place copies into the KV tensor are fine on this thread
        # whether or not the engine made it under inference mode.
        with torch.cuda.device(self.device), torch.cuda.stream(copy_torch), \
                torch.inference_mode():
            for c, (lo, hi) in enumerate(chunks):
                if is_aborted():
                    raise LinkAborted
                b = c % STAGING_BUFFERS
                buf = self.buffers[b][: hi - lo]
                nbytes = (hi - lo) * self.block_bytes
                if sending:
                    copy.wait_event(self.freed[b])
                    trace.gpu_mark(f"copy{c}", copy)
                    (self.first_gather if c == 0 else self.gather)(rows, ids[lo:hi], buf)
                    trace.gpu_mark(f"copied{c}", copy)
                    self.filled[b].record(copy)
                    stream.wait_event(self.filled[b])
                    trace.gpu_mark(f"op{c}", stream)
                    comm.send(buf.data_ptr(), nbytes, nccl.NCCL_INT8, peer, stream.ptr)
                    trace.gpu_mark(f"opped{c}", stream)
                    self.freed[b].record(stream)
                else:
                    stream.wait_event(self.freed[b])
                    trace.gpu_mark(f"op{c}", stream)
                    comm.recv(buf.data_ptr(), nbytes, nccl.NCCL_INT8, peer, stream.ptr)
                    trace.gpu_mark(f"opped{c}", stream)
                    if c == 0:
                        load_ids()
                    self.filled[b].record(stream)
                    copy.wait_event(self.filled[b])
                    trace.gpu_mark(f"copy{c}", copy)
                    (self.last_scatter if c == last else self.scatter)(buf, ids[lo:hi], rows)
                    trace.gpu_mark(f"copied{c}", copy)
                    self.freed[b].record(copy)
                trace.host_mark(f"issued{c}")
        self.copies_done.record(copy)
        stream.wait_event(self.copies_done)
        return count * self.block_bytes
