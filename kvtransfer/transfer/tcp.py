"""Fallback transfer: the decode worker asks the prefill worker for raw block bytes over
gRPC (ReadBlocks) and writes them into its own blocks. Works everywhere; one extra copy
on each side and bounded by the channel's throughput."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import torch

from kvtransfer.transfer.base import KV_HEAD_DIM, BlockReader, KVTransferBackend, PeerInfo


class TcpBackend(KVTransferBackend):
    name = "tcp"

    def __init__(self, kv_cache: torch.Tensor, reader: BlockReader) -> None:
        super().__init__(kv_cache)
        self._reader = reader

    async def pull(self, peer: PeerInfo, request_id: str, src_block_ids: Sequence[int],
                   dst_block_ids: Sequence[int]) -> int:
        if peer.block_bytes != self.block_bytes:
            raise ValueError(f"peer blocks are {peer.block_bytes} bytes, ours "
                             f"{self.block_bytes}: layouts differ")
        chunks = await self._reader(peer.address, request_id, list(src_block_ids))
        data = b"".join(chunks)
        expected = len(dst_block_ids) * self.block_bytes
        if len(data) != expected:
            raise ValueError(f"peer sent {len(data)} bytes, expected {expected}")
        flat = torch.frombuffer(bytearray(data), dtype=self.kv_cache.dtype)
        await self._store(list(dst_block_ids), flat.view(len(dst_block_ids), *self.wire_shape))
        return expected

    @property
    def wire_shape(self) -> tuple[int, ...]:
        """One block as it travels."""
        return tuple(self.kv_cache.shape[1:])

    async def _store(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        idx = torch.tensor(block_ids, dtype=torch.int64)
        self.kv_cache[idx.to(self.kv_cache.device)] = blocks.to(self.kv_cache.device)


# (block ids) -> those blocks with every rank's KV heads, on the CPU; run between steps.
ShardGather = Callable[[list[int]], torch.Tensor]
# (block ids, full-head blocks) -> each rank stores its heads; waits for a step boundary.
ShardScatter = Callable[[list[int], torch.Tensor], Awaitable[None]]


class ShardedTcpBackend(TcpBackend):
    """tcp for a tensor-parallel worker, whose KV heads are split over its ranks (the
    head dim of the cache, in rank order). Blocks travel with every head: the leader
    gathers its followers' shards to serve ReadBlocks and scatters pulled blocks to them,
    so a prefill worker and a decode worker of different --tp still exchange KV (the wire
    format is that of a --tp 1 worker)."""

    def __init__(self, kv_cache: torch.Tensor, reader: BlockReader, tp: int,
                 gather: ShardGather, scatter: ShardScatter) -> None:
        super().__init__(kv_cache, reader)
        self.block_bytes *= tp  # full-head blocks on the wire
        self._tp, self._gather, self._scatter = tp, gather, scatter

    @property
    def wire_shape(self) -> tuple[int, ...]:
        shape = list(self.kv_cache.shape[1:])
        shape[KV_HEAD_DIM - 1] *= self._tp  # shape without the block axis
        return tuple(shape)

    def read_blocks(self, block_ids: Sequence[int], max_chunk_bytes: int = 4 << 20
                    ) -> list[bytes]:
        ids = list(block_ids)
        per_chunk = max(1, max_chunk_bytes // self.block_bytes)
        return [self._gather(ids[i : i + per_chunk]).contiguous().view(torch.uint8)
                .numpy().tobytes() for i in range(0, len(ids), per_chunk)]

    async def _store(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        if block_ids:  # nothing to move (all cached locally): no collective either
            await self._scatter(block_ids, blocks)
