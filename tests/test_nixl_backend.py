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


def test_an_idle_agent_does_not_spin_a_core(monkeypatch) -> None:
    """nixl's Python API starts the UCX progress thread with no poll timeout: one core per
    agent (99% of one, measured), busy even with nothing to move (every worker, every
    tensor-parallel rank). The agents Baton makes wait in poll(). (NIXL's default is not
    started here: an agent that outlived its test would spin through the rest of them.)"""
    import os
    import time

    from kvtransfer.transfer.nixl import make_agent, progress_delay_us

    assert progress_delay_us() == 1000
    agent = make_agent("idle-agent")
    time.sleep(0.2)  # its progress thread is running
    t0, w0 = os.times(), time.monotonic()
    time.sleep(1.0)
    t1 = os.times()
    assert (t1.user + t1.system - t0.user - t0.system) / (time.monotonic() - w0) < 0.3
    del agent
    monkeypatch.setenv("BATON_NIXL_PROGRESS_DELAY_US", "soon")
    with pytest.raises(ValueError, match="BATON_NIXL_PROGRESS_DELAY_US"):
        progress_delay_us()
