"""The transfer interface and the one piece every backend shares: coalescing block lists
into as few contiguous runs as possible (each NIXL descriptor costs microseconds)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")

# Axes of every worker's KV cache tensor (docs/kv_layout.md); tensor-parallel ranks split
# the head axis, in rank order.
KV_LAYOUT = "block,layer,kv,token,head,dim"
KV_HEAD_DIM = KV_LAYOUT.split(",").index("head")


@dataclass(frozen=True)
class BlockRun:
    """`count` consecutive blocks from src_start (remote) to dst_start (local)."""

    src_start: int
    dst_start: int
    count: int


def coalesce(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[BlockRun]:
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destinations")
    runs: list[BlockRun] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            last = runs[-1]
            if s == last.src_start + last.count and d == last.dst_start + last.count:
                runs[-1] = BlockRun(last.src_start, last.dst_start, last.count + 1)
                continue
        runs.append(BlockRun(s, d, 1))
    return runs


def split_runs(block_ids: Sequence[int], run_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """(first block, count) of each run, checking that `run_lengths` cut `block_ids` into
    runs of consecutive ids: how a prefill worker reads the runs a decode worker asks for."""
    if any(n <= 0 for n in run_lengths) or sum(run_lengths) != len(block_ids):
        raise ValueError(f"run lengths {list(run_lengths)[:8]}... do not cover "
                         f"{len(block_ids)} blocks")
    runs, i = [], 0
    for n in run_lengths:
        start = block_ids[i]
        if list(block_ids[i : i + n]) != list(range(start, start + n)):
            raise ValueError(f"blocks {list(block_ids[i : i + n])[:8]} are not one run")
        runs.append((start, n))
        i += n
    return runs


@dataclass(frozen=True)
class SendPlan:
    """One nccl pull as the decode worker asks for it (NcclSend on the wire)."""

    request_id: str
    peer: str  # the decode worker's transfer name
    seq: int  # transfers over this link before this one
    block_ids: tuple[int, ...]  # source blocks, in the order they are sent
    run_lengths: tuple[int, ...]


class PlanRejected(Exception):
    """The prefill worker refused a send plan before queuing anything (the blocks are not
    held for that request, or the plan is malformed); the link stays usable."""


@dataclass(frozen=True)
class PeerInfo:
    """What a decode worker needs about the prefill worker holding a request's KV."""

    address: str  # gRPC address
    agent_name: str
    base_address: int
    block_bytes: int


async def compute_passed(kv_cache: torch.Tensor) -> None:
    """Returns once the device's compute stream has run everything queued on it so far,
    without holding up the event loop. For transfers the stream does not order: a NIXL
    READ into blocks just handed to a pull must not land before kernels queued earlier
    that still touch them, e.g. the next decode step a worker launched before the host
    freed the blocks of a row that stopped (engine/cuda_graphs.py, launch_staged), which
    writes that row's next slot."""
    if not kv_cache.is_cuda:
        return
    done = torch.cuda.Event()
    done.record(torch.cuda.default_stream(kv_cache.device))
    if not done.query():
        await asyncio.to_thread(done.synchronize)


async def wait_out(wait: Callable[[], Awaitable[T]]) -> T:
    """Awaits `wait()`; cancelled meanwhile, waits it out again (shielded) before the
    cancellation goes on. For transfers into blocks the caller frees when cancelled: no
    read may still be writing into blocks handed to another request."""
    try:
        return await wait()
    except asyncio.CancelledError:
        await asyncio.shield(wait())
        raise


# Fetches a prefill worker's NIXL metadata by gRPC address (asked once per peer).
MetadataFetcher = Callable[[str], Awaitable[bytes]]
# Streams raw block bytes from a prefill worker: (address, request_id, block_ids) -> chunks.
BlockReader = Callable[[str, str, list[int]], Awaitable[list[bytes]]]
# Asks a prefill worker to join an NCCL communicator: (address, our name, unique id).
NcclConnector = Callable[[str, str, bytes], Awaitable[None]]
# Asks a prefill worker to queue the sends of one pull: (address, plan).
NcclSendRequester = Callable[[str, SendPlan], Awaitable[None]]


class ControlPlane(Protocol):
    """The calls a decode worker's backend makes to prefill workers (over gRPC:
    `engine.rpc_server.PeerChannels`); each backend takes the ones it needs."""

    async def fetch_metadata(self, address: str) -> bytes: ...

    async def read_blocks(self, address: str, request_id: str, block_ids: list[int]
                          ) -> list[bytes]: ...

    async def nccl_connect(self, address: str, peer: str, unique_id: bytes) -> None: ...

    async def nccl_send(self, address: str, plan: SendPlan) -> None: ...


class KVTransferBackend(abc.ABC):
    """One per worker, over that worker's whole KV cache tensor
    [num_blocks, ...] (a block is one contiguous region of `block_bytes`)."""

    name: str

    def __init__(self, kv_cache: torch.Tensor) -> None:
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache must be one contiguous tensor")
        self.kv_cache = kv_cache
        self.block_bytes = kv_cache[0].numel() * kv_cache.element_size()
        self.base_address = kv_cache.data_ptr()

    @property
    def agent_name(self) -> str:
        return ""

    def metadata(self) -> bytes:
        return b""

    def check_layout(self, peer: PeerInfo) -> None:
        """Blocks are copied byte for byte: both sides must cut the cache the same way."""
        if peer.block_bytes != self.block_bytes:
            raise ValueError(f"peer blocks are {peer.block_bytes} bytes, ours "
                             f"{self.block_bytes}: layouts differ")

    @abc.abstractmethod
    async def pull(self, peer: PeerInfo, request_id: str, src_block_ids: Sequence[int],
                   dst_block_ids: Sequence[int]) -> int:
        """Copy the peer's blocks into ours; returns bytes moved."""

    def read_blocks(self, block_ids: Sequence[int], max_chunk_bytes: int = 4 << 20
                    ) -> list[bytes]:
        """Serve raw bytes of our blocks (the tcp path; also a debugging aid)."""
        chunks, cur, size = [], [], 0
        for run in coalesce(block_ids, block_ids):
            data = self.kv_cache[run.src_start : run.src_start + run.count]
            raw = data.contiguous().view(torch.uint8).numpy().tobytes() \
                if data.device.type == "cpu" else data.cpu().view(torch.uint8).numpy().tobytes()
            for off in range(0, len(raw), self.block_bytes):
                cur.append(raw[off : off + self.block_bytes])
                size += self.block_bytes
                if size >= max_chunk_bytes:
                    chunks.append(b"".join(cur))
                    cur, size = [], 0
        if cur:
            chunks.append(b"".join(cur))
        return chunks

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass
