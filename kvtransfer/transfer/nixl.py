"""NIXL transfer: each worker registers its whole KV tensor with a NIXL agent (UCX
backend; DRAM on CPU, VRAM on GPU). The decode worker READs the prefill worker's blocks
one-sidedly: one descriptor per run of consecutive blocks on both sides."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch

from kvtransfer.transfer.base import KVTransferBackend, MetadataFetcher, PeerInfo, coalesce

log = logging.getLogger(__name__)


class NixlBackend(KVTransferBackend):
    name = "nixl"

    def __init__(self, kv_cache: torch.Tensor, agent_name: str,
                 fetch_metadata: MetadataFetcher) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        super().__init__(kv_cache)
        self._name = agent_name
        self._agent = nixl_agent(agent_name, nixl_agent_config(backends=["UCX"]))
        self._mem = "VRAM" if kv_cache.is_cuda else "DRAM"
        self._dev = kv_cache.device.index or 0 if kv_cache.is_cuda else 0
        self._reg = self._agent.register_memory(
            [(self.base_address, kv_cache.numel() * kv_cache.element_size(), self._dev, "")],
            self._mem)
        self._fetch_metadata = fetch_metadata
        self._peers: dict[str, str] = {}  # peer agent name -> name NIXL knows it by
        self._peer_lock = asyncio.Lock()

    @property
    def agent_name(self) -> str:
        return self._name

    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    async def _ensure_peer(self, peer: PeerInfo) -> str:
        async with self._peer_lock:
            if peer.agent_name not in self._peers:
                meta = await self._fetch_metadata(peer.address)
                self._peers[peer.agent_name] = self._agent.add_remote_agent(meta)
            return self._peers[peer.agent_name]

    async def pull(self, peer: PeerInfo, request_id: str, src_block_ids: Sequence[int],
                   dst_block_ids: Sequence[int]) -> int:
        if not src_block_ids:
            return 0
        self.check_layout(peer)
        remote_name = await self._ensure_peer(peer)
        bb = self.block_bytes
        runs = coalesce(src_block_ids, dst_block_ids)
        local = [(self.base_address + r.dst_start * bb, r.count * bb, self._dev) for r in runs]
        remote = [(peer.base_address + r.src_start * bb, r.count * bb, 0) for r in runs]
        local_descs = self._agent.get_xfer_descs(local, self._mem)
        remote_descs = self._agent.get_xfer_descs(remote, self._mem)
        handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, remote_name,
                                             request_id.encode())
        try:
            state = self._agent.transfer(handle)
            while state not in ("DONE", "ERR"):
                await asyncio.sleep(0)  # the UCX progress thread moves the bytes
                state = self._agent.check_xfer_state(handle)
            if state == "ERR":
                raise RuntimeError(f"NIXL READ from {peer.agent_name} failed")
        finally:
            self._agent.release_xfer_handle(handle)
        return sum(r.count for r in runs) * bb

    def close(self) -> None:
        try:
            self._agent.deregister_memory(self._reg)
        except Exception as e:  # best effort at shutdown
            log.debug("NIXL deregister failed: %s", e)
