"""The data path of the nccl backend, without a control plane. An `NcclLink` owns one
2-rank NCCL communicator (CuPy's `cupy.cuda.nccl`) between a prefill worker (rank 0, which
sends) and a decode worker (rank 1, which receives), a CUDA stream of its own and a thread
that joins the communicator and then runs transfers one at a time, in submission order.

A transfer is a list of block runs (first block, count). Long runs move as they are: one
ncclSend on one side and one ncclRecv on the other per run, grouped
(`groupStart`/`groupEnd`) so NCCL runs them together. Many short runs (a pool's scattered
blocks) are staged (kvtransfer/transfer/staging.py): gathered into a contiguous buffer,
sent in chunks, scattered on arrival. NCCL pairs the k-th send with the k-th receive, so
both sides must submit runs of the same lengths in the same order: that order is the
protocol, and callers serialize transfers per link. The benchmark
(benchmarks/gpu_transfer.py) drives links directly, with a pipe for control."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence

import torch

from kvtransfer.transfer.nccl_staged import LinkAborted, StagedPath
from kvtransfer.transfer.nccl_trace import NO_TRACE, TransferTrace
from kvtransfer.transfer.staging import DEFAULT_PLAN, StagingPlan, as_block_rows

log = logging.getLogger(__name__)

SENDER, RECEIVER = 0, 1  # ranks: prefill, decode
UNIQUE_ID_BYTES = 128
# NCCL documents at most 2048 operations between groupStart and groupEnd; longer transfers
# are issued as consecutive groups, split the same way on both sides.
MAX_OPS_PER_GROUP = 1024

Runs = Sequence[tuple[int, int]]  # (first block, count), in transfer order


class LinkBroken(RuntimeError):
    """The link failed or was aborted; its two sides may disagree on what moved, so it is
    never used again (the backend makes a new one)."""


def cupy_nccl_reason() -> str | None:
    """Why CuPy's NCCL bindings cannot be used in this process, or None (shared by the
    nccl KV backend and the tensor-parallel communicator, kernels/tp_comm.py)."""
    try:
        from cupy.cuda import nccl
    except Exception as e:  # ImportError, or a CUDA library CuPy cannot load
        return f"CuPy is not installed (import cupy.cuda.nccl: {e})"
    if not getattr(nccl, "available", False) or not hasattr(nccl, "NcclCommunicator"):
        return "CuPy cannot load the NCCL library (libnccl.so.2)"
    return None


def unique_id_to_bytes(uid: Sequence[int]) -> bytes:
    """CuPy gives the ncclUniqueId as 128 C chars (signed on x86, unsigned on Arm)."""
    if len(uid) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(uid)}")
    return bytes(b & 0xFF for b in uid)


def new_unique_id() -> bytes:
    """A fresh ncclUniqueId; its maker hosts the rendezvous while the two ranks join."""
    from cupy.cuda import nccl

    return unique_id_to_bytes(nccl.get_unique_id())


def unique_id_candidates(data: bytes) -> list[bytes | tuple[int, ...]]:
    """The id in each form some CuPy takes back: bytes (CuPy 14: `NcclCommunicator(int
    ndev, bytes commId, int rank)`), then a tuple of signed chars, then of unsigned ones
    (CuPy 13 and before, by platform). A wrong form fails in CuPy's argument conversion
    (TypeError, OverflowError) before NCCL is called, so trying them in turn is safe."""
    if len(data) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {len(data)}")
    signed = tuple(b - 256 if b > 127 else b for b in data)
    unsigned = tuple(data)
    return [bytes(data), signed] if signed == unsigned else [bytes(data), signed, unsigned]


def init_communicator(world: int, unique_id: bytes, rank: int):
    """`nccl.NcclCommunicator(world, id, rank)` with the id in whichever form this CuPy
    takes; collective: every rank of the id must call it."""
    from cupy.cuda import nccl

    for candidate in unique_id_candidates(unique_id):
        try:
            return nccl.NcclCommunicator(world, candidate, rank)
        except (TypeError, OverflowError):
            continue
    raise ValueError("this CuPy takes the NCCL unique id neither as bytes nor as a tuple "
                     "of signed or unsigned chars")


def run_extents(runs: Runs, block_bytes: int) -> list[tuple[int, int]]:
    """(byte offset into the KV tensor, byte count) of each run, in order."""
    return [(start * block_bytes, count * block_bytes) for start, count in runs]


def group_batches(num_ops: int, max_ops: int = MAX_OPS_PER_GROUP) -> list[range]:
    """Consecutive operation index ranges, one NCCL group each."""
    return [range(i, min(i + max_ops, num_ops)) for i in range(0, num_ops, max_ops)]


# A transfer of up to a few hundred MB ends within about a millisecond over NVLink; a
# thread sleeping in a blocking event sync takes tens of microseconds (more under load)
# to be woken, a share such transfers notice. So the link polls first, yielding the GIL
# between polls, and sleeps only past this.
SPIN_SECONDS = 0.002


def wait_for(event, spin_s: float = SPIN_SECONDS) -> None:
    """Until the CUDA `event` (a cupy.cuda.Event made with block=True) has completed:
    polled (`done`) for up to `spin_s`, then a blocking sync (GIL released; abort() from
    another thread ends a hang). `done` is False on an error too: the sync raises it."""
    deadline = time.perf_counter() + spin_s
    while not event.done:
        if time.perf_counter() > deadline:
            event.synchronize()
            return
        time.sleep(0)


def compute_marker(device: int, compute_stream: int = 0):
    """A CUDA event recorded now on the compute stream. Recorded between engine steps
    (under the engine lock: a step ends with a host sync), it completes at once, so a
    transfer waiting on it does not also wait for the step running when its turn comes."""
    import cupy

    with cupy.cuda.Device(device):
        event = cupy.cuda.Event(disable_timing=True)
        cupy.cuda.runtime.eventRecord(event.ptr, compute_stream)
    return event


class NcclLink:
    """One side of a prefill-decode link over the KV tensor at `base_address` on `device`.
    `ready` resolves once the communicator is joined (both sides must join concurrently);
    transfers submitted before that wait behind the join. With `kv_cache` (the tensor at
    `base_address`) scattered runs are staged as `plan` says; both sides must pass it, or
    neither, with equal plans. `trace` keeps where each transfer's time went (nccl_trace)
    in `traces`, the latest last."""

    def __init__(self, rank: int, unique_id: bytes, device: int, base_address: int,
                 block_bytes: int, name: str, compute_stream: int = 0,
                 kv_cache: torch.Tensor | None = None, plan: StagingPlan = DEFAULT_PLAN,
                 trace: bool = False) -> None:
        if rank not in (SENDER, RECEIVER):
            raise ValueError(f"rank must be {SENDER} (sender) or {RECEIVER} (receiver)")
        self.rank = rank
        self.device = device
        self.base_address = base_address
        self.block_bytes = block_bytes
        self.name = name
        # The stream the engine computes on: transfers start after the work queued on it.
        self.compute_stream = compute_stream
        if kv_cache is not None and kv_cache.data_ptr() != base_address:
            raise ValueError("kv_cache must be the tensor at base_address")
        self._rows = None if kv_cache is None else as_block_rows(kv_cache, block_bytes)
        self.plan = plan
        self._staged: StagedPath | None = None  # made when the link joins
        self.trace = trace
        self.traces: collections.deque[dict] = collections.deque(maxlen=1024)
        self._trace_events: list = []  # timing events, made as traces need them, reused
        unique_id_candidates(unique_id)  # a malformed id fails here, not on the link thread
        self._uid = unique_id
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.broken = False
        self._comm = None
        self._lock = threading.Lock()  # `broken` and `_comm` change together
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"nccl-{name}", daemon=True)
        self._thread.start()

    def submit(self, runs: Runs, after=None) -> concurrent.futures.Future[int]:
        """Queue one transfer of these runs (sent from rank 0, received on rank 1); the
        future gives the bytes moved once the transfer stream has finished them. It starts
        after CUDA event `after` (see `compute_marker`), or by default after all the work
        queued on the compute stream when its turn comes."""
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        if self.broken:
            fut.set_exception(LinkBroken(f"NCCL link {self.name} is broken"))
        else:
            self._jobs.put((fut, list(runs), after, time.perf_counter()))
        return fut

    def abort(self) -> None:
        """Abort the communicator (kernels waiting on a dead peer return) and stop the
        thread. Any thread may call it, more than once."""
        with self._lock:
            self.broken = True
            comm, self._comm = self._comm, None
        self._jobs.put(None)
        if comm is not None:
            try:
                comm.abort()
            except Exception as e:  # already torn down: nothing left to stop
                log.warning("NCCL link %s: abort failed: %s", self.name, e)

    def wait_closed(self, timeout: float) -> bool:
        """After abort(): wait until the link thread has stopped, which it does only once
        the GPU work of its last transfer has run out (`_transfer`), so the blocks that
        transfer touched are no longer written. False if it did not stop in time."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        if not self.ready.set_running_or_notify_cancel():
            return
        try:
            self._join()
        except BaseException as e:
            self.broken = True
            self.ready.set_exception(e)
            self._fail_queued(e)
            return
        self.ready.set_result(None)
        while (job := self._jobs.get()) is not None:
            fut, runs, after, submitted_at = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(self._transfer(runs, after, submitted_at))
            except BaseException as e:
                self.broken = True  # the sides may now disagree on what moved
                fut.set_exception(e)
                break
        self._fail_queued(LinkBroken(f"NCCL link {self.name} is closed"))

    def _fail_queued(self, err: BaseException) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None and job[0].set_running_or_notify_cancel():
                job[0].set_exception(err)

    def _join(self) -> None:
        import cupy
        from cupy.cuda import nccl

        cupy.cuda.runtime.setDevice(self.device)  # this thread's device, for NCCL too
        self._stream = cupy.cuda.Stream(non_blocking=True)  # never waits on the compute stream
        self._after_compute = cupy.cuda.Event(disable_timing=True)
        # Blocking sync: a link waiting on a slow peer sleeps instead of spinning a core.
        self._done = cupy.cuda.Event(block=True, disable_timing=True)
        # Staged transfers: gathers/scatters run on a second stream beside the sends.
        self._copy_stream = cupy.cuda.Stream(non_blocking=True)
        self._copy_stream_torch = torch.cuda.ExternalStream(
            self._copy_stream.ptr, device=torch.device("cuda", self.device))
        comm = init_communicator(2, self._uid, self.rank)
        with self._lock:
            aborted = self.broken
            if not aborted:
                self._comm = comm
        if aborted:  # while joining
            comm.abort()
            raise LinkBroken(f"NCCL link {self.name} was aborted while joining")
        if self._rows is not None:
            self._staged = StagedPath(self._rows, self.block_bytes, self.plan, self.device)
        # The first send/recv between two ranks sets up their connection, which needs both
        # sides; doing it here keeps that cost (and that rendezvous) out of the first pull.
        scratch = cupy.zeros(1, dtype=cupy.uint8)
        op = comm.send if self.rank == SENDER else comm.recv
        op(scratch.data.ptr, 1, nccl.NCCL_INT8, 1 - self.rank, self._stream.ptr)
        self._stream.synchronize()
        if self._comm is None:
            raise LinkBroken(f"NCCL link {self.name} was aborted while connecting")

    def _transfer(self, runs: Runs, after, submitted_at: float) -> int:
        from cupy.cuda import runtime

        comm = self._comm
        if comm is None:
            raise LinkBroken(f"NCCL link {self.name} is aborted")
        # Invariant: a transfer touches its blocks only after the compute work queued before
        # it was asked for: on the prefill side the step that wrote them, on the decode side
        # any copy or kernel still reading blocks that were freed and handed to this pull
        # (a host-tier offload of an evicted block, say).
        if after is None:
            runtime.eventRecord(self._after_compute.ptr, self.compute_stream)
            after = self._after_compute
        trace = TransferTrace(submitted_at, self._trace_events) if self.trace else NO_TRACE
        try:
            moved = self._queue_and_wait(comm, runs, after, trace)
        except LinkAborted:
            self._copy_stream.synchronize()
            self._stream.synchronize()
            raise LinkBroken(f"NCCL link {self.name} was aborted during a transfer") from None
        except BaseException:
            # Whatever was queued runs out before the caller hears of the failure (an
            # aborted NCCL operation returns; a scatter queued behind it still writes):
            # only then may the caller free or reuse the blocks.
            self._copy_stream.synchronize()
            self._stream.synchronize()
            raise
        if self.trace:
            self.traces.append({"runs": len(runs), "bytes": moved, **trace.summary()})
        return moved

    def _queue_and_wait(self, comm, runs: Runs, after, trace) -> int:
        from cupy.cuda import nccl

        self._stream.wait_event(after)
        trace.gpu_mark("start", self._stream)
        op = comm.send if self.rank == SENDER else comm.recv
        peer = 1 - self.rank
        chunks = (None if self._staged is None
                  else self.plan.chunks([count for _, count in runs], self.block_bytes))
        if chunks is None:
            extents = run_extents(runs, self.block_bytes)
            for batch in group_batches(len(extents)):
                nccl.groupStart()
                try:
                    for i in batch:
                        offset, nbytes = extents[i]
                        op(self.base_address + offset, nbytes, nccl.NCCL_INT8, peer,
                           self._stream.ptr)
                finally:
                    nccl.groupEnd()
            moved = sum(nbytes for _, nbytes in extents)
        else:
            moved = self._staged.queue(comm, self.rank == SENDER, peer, self._stream,
                                       self._copy_stream, self._copy_stream_torch, runs,
                                       chunks, after, lambda: self._comm is None, trace)
        trace.gpu_mark("end", self._stream)
        self._done.record(self._stream)
        trace.host_mark("queued")
        wait_for(self._done)
        trace.host_mark("seen_done")
        if self._comm is None:
            raise LinkBroken(f"NCCL link {self.name} was aborted during a transfer")
        comm.check_async_error()
        return moved
