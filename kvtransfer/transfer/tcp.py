"""Fallback transfer: the decode worker asks the prefill worker for raw block bytes over
gRPC (ReadBlocks) and writes them into its own blocks. Works everywhere; one extra copy
on each side and bounded by the channel's throughput."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.transfer.base import BlockReader, KVTransferBackend, PeerInfo


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
        blocks = flat.view(len(dst_block_ids), *self.kv_cache.shape[1:])
        idx = torch.tensor(list(dst_block_ids), dtype=torch.int64)
        self.kv_cache[idx.to(self.kv_cache.device)] = blocks.to(self.kv_cache.device)
        return expected
