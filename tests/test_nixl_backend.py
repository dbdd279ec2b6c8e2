"""The single-process NIXL backend over host memory (real NIXL agents, UCX, in one
process): a pull lands the right blocks, and it names the device id the peer registered
its region under, which the peer serves with its metadata (a worker on cuda:1 of a
machine it does not have to itself registers under 1; the read used to name 0, and NIXL
answered NOT_FOUND)."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from kvtransfer.transfer.base import PeerInfo

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nixl") is None,
                                reason="NIXL is not installed")


def test_pull_names_the_peer_region_device_id() -> None:
    from kvtransfer.transfer.nixl import NixlBackend, unpack_rank_agents

    shape = (8, 2, 2, 4, 2, 4)  # blocks, layers, k/v, tokens, heads, head dim
    src = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    dst = torch.zeros(shape)
    prefill = NixlBackend(src, "nixl-test-prefill", None, dram_device_id=3)

    async def fetch(address: str) -> bytes:
        return prefill.metadata()

    decode = NixlBackend(dst, "nixl-test-decode", fetch)
    try:
        served = unpack_rank_agents(prefill.metadata())
        assert [r.device_id for r in served] == [3]
        peer = PeerInfo("prefill:1", prefill.agent_name, prefill.base_address,
                        prefill.block_bytes)
        moved = asyncio.run(decode.pull(peer, "r1", [2, 5, 6], [0, 1, 2]))
        assert moved == 3 * prefill.block_bytes
        assert torch.equal(dst[0], src[2]) and torch.equal(dst[1:3], src[5:7])
        assert not dst[3:].any()  # nothing else written
    finally:
        decode.close()
        prefill.close()
