"""The GPU collectives of a tensor-parallel group, through an NCCL communicator Baton owns
(CuPy's `cupy.cuda.nccl`, as vLLM's "pynccl") instead of torch.distributed's.

Why not torch.distributed: each of its all-reduce calls spends ~80 us of host time (work
objects, parameter-comms recording, event bookkeeping), and an 8B decode step makes 65 of
them; and capturing them into a CUDA graph hung on two H200s. Here a call is one
`ncclAllReduce` on the caller's current torch stream, with no side stream, event or
watchdog, so it is ordered with the compute around it and, under `torch.cuda.graph`,
recorded into the graph like any kernel (NCCL supports stream capture since 2.9).

Invariants: every rank issues the same collectives in the same order (the model's
forward does); a tensor is reduced in place on the stream that produced it, so the torch
allocator needs no cross-stream bookkeeping. A rank that dies leaves the others blocked
in a collective (no watchdog here): the TP leader exits when a follower does, followers
die with the leader (engine/tensor_parallel.py).

Without CuPy (or without a loadable libnccl) the group falls back to torch.distributed,
with a warning, rather than refusing to start: results are the same, only the host cost
stays and decode graphs stay off under TP. CuPy is optional elsewhere too (the `nccl` KV
transfer backend), and a slower worker is more useful than none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvtransfer.transfer.nccl_link import (
    UNIQUE_ID_BYTES,
    init_communicator,
    new_unique_id,
)
from kvtransfer.transfer.nccl_link import cupy_nccl_reason as unavailable_reason  # noqa: F401

# ncclBfloat16 in nccl.h since NCCL 2.10; CuPy builds older than that name lack the constant.
NCCL_BFLOAT16 = 9
NCCL_BFLOAT16_MIN_VERSION = 21000


class NcclComm:
    """One rank's NCCL communicator over the whole TP group, on `device`. Collective: every
    rank constructs it at the same point; rank 0 makes the ncclUniqueId and sends it as
    128 bytes over `group` (a gloo group of the same ranks)."""

    def __init__(self, rank: int, world: int, device: torch.device, group) -> None:
        import cupy
        from cupy.cuda import nccl

        self.rank, self.world = rank, world
        self.device = torch.device(device)
        if self.device.index is None:  # tensors report an indexed device: compare with one
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.nccl_version = nccl.get_version()
        uid = torch.zeros(UNIQUE_ID_BYTES, dtype=torch.uint8)
        if rank == 0:
            uid = torch.tensor(list(new_unique_id()), dtype=torch.uint8)
        dist.broadcast(uid, src=0, group=group)
        with cupy.cuda.Device(self.device.index):  # NCCL binds the comm to the current device
            self._comm = init_communicator(world, bytes(uid.tolist()), rank)
        self._sum = nccl.NCCL_SUM
        self._dtypes = {torch.float32: nccl.NCCL_FLOAT32, torch.float16: nccl.NCCL_FLOAT16,
                        torch.int32: nccl.NCCL_INT32, torch.int64: nccl.NCCL_INT64}
        bf16 = getattr(nccl, "NCCL_BFLOAT16", None)
        if bf16 is None and self.nccl_version >= NCCL_BFLOAT16_MIN_VERSION:
            bf16 = NCCL_BFLOAT16
        if bf16 is not None:
            self._dtypes[torch.bfloat16] = bf16
        # The first collective sets up the ranks' connections: here, not in the first step.
        probe = torch.ones(1, device=self.device)
        self.all_reduce(probe)
        if int(probe.item()) != world:
            raise RuntimeError(f"NCCL all-reduce check failed: {probe.item()} != {world}")

    def _nccl_dtype(self, x: torch.Tensor) -> int:
        try:
            return self._dtypes[x.dtype]
        except KeyError:
            hint = (f" (bfloat16 needs NCCL 2.10 or later; CuPy loaded NCCL "
                    f"{self.nccl_version}: use --dtype float16 or float32)"
                    if x.dtype == torch.bfloat16 else "")
            raise TypeError(f"no NCCL collective for {x.dtype}{hint}") from None

    def _check(self, x: torch.Tensor) -> None:
        if self._comm is None:
            raise RuntimeError("the NCCL communicator is closed")
        if x.device != self.device:
            raise ValueError(f"an NCCL collective on {self.device} got a tensor on {x.device}")
        if not x.is_contiguous():
            raise ValueError("NCCL collectives need contiguous tensors (all_reduce works in "
                             "place)")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group, in place, on the current stream; returns `x`."""
        self._check(x)
        ptr = x.data_ptr()
        self._comm.allReduce(ptr, ptr, x.numel(), self._nccl_dtype(x), self._sum,
                             torch.cuda.current_stream(self.device).cuda_stream)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[world, *x.shape]: every rank's `x`, in rank order, on the current stream."""
        x = x.contiguous()
        self._check(x)
        out = torch.empty((self.world, *x.shape), dtype=x.dtype, device=x.device)
        self._comm.allGather(x.data_ptr(), out.data_ptr(), x.numel(), self._nccl_dtype(x),
                             torch.cuda.current_stream(self.device).cuda_stream)
        return out

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` into every rank's `x`, in place, on the current stream; returns `x`.
        (The leader's sampled token ids reach the followers this way when the next decode
        step is launched ahead: ModelRunner.follow.)"""
        self._check(x)
        ptr = x.data_ptr()
        self._comm.broadcast(ptr, ptr, x.numel(), self._nccl_dtype(x), 0,
                             torch.cuda.current_stream(self.device).cuda_stream)
        return x

    def close(self) -> None:
        """Frees the communicator. Abort, not destroy: it is local and cannot wait on a
        peer; after the device has synchronized no collective of ours is in flight.
        Destroy every CUDA graph that captured its collectives first: NCCL 2.26+ waits
        for them in abort too (ModelRunner.release_graphs)."""
        if self._comm is not None:
            torch.cuda.synchronize(self.device)
            self._comm.abort()
            self._comm = None
