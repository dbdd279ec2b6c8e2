"""NIXL transfer: each worker registers its whole KV tensor with a NIXL agent (UCX
backend; DRAM on CPU, VRAM on GPU). The decode worker READs the prefill worker's blocks
one-sidedly: one descriptor per run of consecutive blocks on both sides.

Under tensor parallelism every rank has its own agent over its KV shard, and rank r of
the decode worker reads rank r's shard of the prefill worker (`ShardedNixlBackend`): no
gather through the leader, every rank pair moves its bytes at once. A tensor-parallel
worker's metadata lists its ranks' agents (`pack_rank_agents`)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import msgpack
import torch

from kvtransfer.transfer.base import (
    KVTransferBackend,
    MetadataFetcher,
    PeerInfo,
    coalesce,
    compute_passed,
    wait_out,
)

log = logging.getLogger(__name__)

# Starts the metadata every worker serves: its ranks' agents (one for a single process).
TP_METADATA_MAGIC = b"BATON-TP-NIXL\x00"


@dataclass(frozen=True)
class RankAgent:
    """One tensor-parallel rank's NIXL agent, as a peer rank needs it."""

    agent_name: str
    metadata: bytes
    base_address: int
    block_bytes: int
    # The device id its KV was registered with (the rank's GPU index in its worker; on CPU
    # the rank): a remote descriptor must name it, or NIXL finds no such region.
    device_id: int

    def as_list(self) -> list:
        return [self.agent_name, self.metadata, self.base_address, self.block_bytes,
                self.device_id]


def progress_delay_us() -> int:
    """How long (microseconds) the UCX progress thread sleeps in poll() between wake-ups
    when nothing signals it: `BATON_NIXL_PROGRESS_DELAY_US`, default 1000. 0 keeps NIXL's
    own default, which polls with no timeout at all: a whole core per agent, spinning even
    on an idle worker (every tensor-parallel rank has an agent)."""
    value = os.environ.get("BATON_NIXL_PROGRESS_DELAY_US", "1000")
    try:
        delay = int(value)
    except ValueError:
        raise ValueError(f"BATON_NIXL_PROGRESS_DELAY_US={value!r}: not a whole number of "
                         "microseconds") from None
    if delay < 0:
        raise ValueError(f"BATON_NIXL_PROGRESS_DELAY_US={delay}: must be >= 0")
    return delay


def ucx_params() -> dict[str, str]:
    """The UCX backend's init parameters. `BATON_NIXL_UCX_THREADS` > 0 starts NIXL's
    thread-pool engine: a transfer of at least `BATON_NIXL_UCX_SPLIT` descriptors is split
    across that many threads, each with its own UCX worker and so its own CUDA stream per
    peer GPU. With one worker every descriptor of a READ is a cuMemcpyDtoDAsync queued
    one after another on one stream, a few microseconds each: scattered 2 MiB blocks then
    move at about half of NVLink's bandwidth. On two H200s 4 threads split at 8 did not
    help (53-58% of a contiguous send/recv against 51-58%, gpu_transfer_h200x2.json), so
    the engine stays off unless asked for."""
    params: dict[str, str] = {}
    for env, key, low in (("BATON_NIXL_UCX_THREADS", "num_threads", 0),
                          ("BATON_NIXL_UCX_SPLIT", "split_batch_size", 1)):
        value = os.environ.get(env)
        if value is None:
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{env}={value!r}: not a whole number") from None
        if number < low:
            raise ValueError(f"{env}={number}: must be >= {low}")
        params[key] = str(number)
    return params


def _new_agent(name: str):
    from nixl._api import nixl_agent, nixl_agent_config

    params = ucx_params()  # a bad setting fails before an agent starts
    agent = nixl_agent(name, nixl_agent_config(backends=[]))
    agent.create_backend("UCX", params)
    return agent


_CONFIG_SWAP = threading.Lock()


def make_agent(name: str):
    """A NIXL agent with the UCX backend whose progress thread waits `progress_delay_us()`
    in poll() instead of spinning. nixl's Python API (1.5) hard-codes the delay to 0, so
    the config class it builds is swapped, for this one call, for one that raises it;
    a worker's completion checks (`check_xfer_state`) still progress its transfers."""
    from nixl import _api

    delay = progress_delay_us()
    # Under the lock: a thread swapping meanwhile could make `base` the subclass, and
    # restoring it would leave the swap in place for good.
    with _CONFIG_SWAP:
        base = getattr(_api.nixlBind, "nixlAgentConfig", None)
        if not delay or base is None or not hasattr(base, "pthrDelay"):
            return _new_agent(name)

        class DelayedConfig(base):
            @property
            def pthrDelay(self) -> int:
                return base.pthrDelay.__get__(self)

            @pthrDelay.setter
            def pthrDelay(self, value: int) -> None:
                base.pthrDelay.__set__(self, max(int(value), delay))

        _api.nixlBind.nixlAgentConfig = DelayedConfig
        try:
            return _new_agent(name)
        finally:
            _api.nixlBind.nixlAgentConfig = base


def pack_rank_agents(ranks: Sequence[RankAgent]) -> bytes:
    return TP_METADATA_MAGIC + msgpack.packb([r.as_list() for r in ranks])


def unpack_rank_agents(blob: bytes) -> list[RankAgent]:
    """A worker's agents, one per tensor-parallel rank (one for a single process), as
    `NixlBackend.metadata` / `ShardedNixlBackend.metadata` serve them."""
    if not blob.startswith(TP_METADATA_MAGIC):
        raise ValueError("the peer's NIXL metadata is not a list of Baton rank agents "
                         "(a worker of another version?)")
    return [RankAgent(*r) for r in msgpack.unpackb(blob[len(TP_METADATA_MAGIC):])]


class NixlBackend(KVTransferBackend):
    name = "nixl"

    def __init__(self, kv_cache: torch.Tensor, agent_name: str,
                 fetch_metadata: MetadataFetcher, dram_device_id: int = 0) -> None:
        """`dram_device_id`: the id host memory is registered under (NIXL matches remote
        descriptors to regions by it; tensor-parallel ranks on CPU use their rank, so the
        CPU tests check that each read names its peer rank's id, as GPUs need)."""
        super().__init__(kv_cache)
        self._name = agent_name
        self._agent = make_agent(agent_name)
        self._mem = "VRAM" if kv_cache.is_cuda else "DRAM"
        self.device_id = (kv_cache.device.index or 0) if kv_cache.is_cuda else dram_device_id
        self._reg = self._agent.register_memory(
            [(self.base_address, kv_cache.numel() * kv_cache.element_size(), self.device_id, "")],
            self._mem)
        self._fetch_metadata = fetch_metadata
        # peer agent name -> (name NIXL knows it by, device id of its KV region)
        self._peers: dict[str, tuple[str, int]] = {}
        self._peer_lock = asyncio.Lock()

    @property
    def agent_name(self) -> str:
        return self._name

    def agent_metadata(self) -> bytes:
        """NIXL's own metadata of this agent (what a peer's agent loads)."""
        return self._agent.get_agent_metadata()

    def metadata(self) -> bytes:
        """What the worker serves to decode workers: this agent as a one-rank list, so a
        peer also learns the device id its region is registered under (a worker started
        on cuda:1 of an unrestricted machine registers under 1, and NIXL matches remote
        descriptors to regions by it)."""
        return pack_rank_agents([RankAgent(self._name, self.agent_metadata(),
                                           self.base_address, self.block_bytes,
                                           self.device_id)])

    async def _ensure_peer(self, peer: PeerInfo) -> tuple[str, int]:
        """(the name NIXL knows the peer by, the device id of its KV region)."""
        async with self._peer_lock:
            if peer.agent_name not in self._peers:
                ranks = unpack_rank_agents(await self._fetch_metadata(peer.address))
                if len(ranks) != 1:
                    raise ValueError(tp_mismatch(len(ranks), 1))
                self.add_peer(peer.agent_name, ranks[0].metadata, ranks[0].device_id)
            return self._peers[peer.agent_name]

    async def pull(self, peer: PeerInfo, request_id: str, src_block_ids: Sequence[int],
                   dst_block_ids: Sequence[int]) -> int:
        if not src_block_ids:
            return 0
        self.check_layout(peer)
        remote_name, remote_device = await self._ensure_peer(peer)
        await compute_passed(self.kv_cache)  # no kernel queued before may touch dst now
        handle, moved = self.start_read(remote_name, peer.base_address, remote_device,
                                        request_id, src_block_ids, dst_block_ids)
        try:
            state = await wait_out(lambda: self._landed(handle))
            if state == "ERR":
                raise RuntimeError(f"NIXL READ from {peer.agent_name} failed")
        finally:
            self._agent.release_xfer_handle(handle)
        return moved

    async def _landed(self, handle) -> str:
        while (state := self._agent.check_xfer_state(handle)) not in ("DONE", "ERR"):
            await asyncio.sleep(0)  # the check (and the UCX progress thread) moves them
        return state

    def add_peer(self, agent_name: str, metadata: bytes, device_id: int) -> str:
        """Registers a peer from metadata already in hand (tensor-parallel ranks get their
        peer rank's through the leader) and the device id of its KV region; returns the
        name NIXL knows it by."""
        if agent_name not in self._peers:
            self._peers[agent_name] = (self._agent.add_remote_agent(metadata), device_id)
        return self._peers[agent_name][0]

    def start_read(self, remote_name: str, remote_base: int, remote_dev: int, request_id: str,
                   src_block_ids: Sequence[int], dst_block_ids: Sequence[int]):
        """Posts one READ of the peer's blocks (registered at `remote_base` under device id
        `remote_dev`) into ours, one descriptor per run of consecutive blocks; returns
        (handle, bytes). The caller waits and releases."""
        bb = self.block_bytes
        runs = coalesce(src_block_ids, dst_block_ids)
        local = [(self.base_address + r.dst_start * bb, r.count * bb, self.device_id) for r in runs]
        remote = [(remote_base + r.src_start * bb, r.count * bb, remote_dev) for r in runs]
        local_descs = self._agent.get_xfer_descs(local, self._mem)
        remote_descs = self._agent.get_xfer_descs(remote, self._mem)
        # No notification message: the peer never reads them, and NIXL keeps every one it
        # receives until read (a request id per pull, for the prefill worker's lifetime).
        handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, remote_name)
        state = self._agent.transfer(handle)
        if state == "ERR":
            self._agent.release_xfer_handle(handle)
            raise RuntimeError(f"NIXL READ of {request_id} could not be posted")
        return handle, sum(r.count for r in runs) * bb

    def read_state(self, handle) -> int:
        """1 when a read from `start_read` is done, 0 while in flight, -1 if it failed."""
        state = self._agent.check_xfer_state(handle)
        return 1 if state == "DONE" else -1 if state == "ERR" else 0

    def release_read(self, handle) -> None:
        self._agent.release_xfer_handle(handle)

    def close(self) -> None:
        try:
            self._agent.deregister_memory(self._reg)
        except Exception as e:  # best effort at shutdown
            log.debug("NIXL deregister failed: %s", e)


def tp_mismatch(peer_tp: int, own_tp: int) -> str:
    return (f"the prefill worker's KV is split over {peer_tp} tensor-parallel ranks and this "
            f"worker has {own_tp}: --kv-transfer nixl pairs rank r with rank r, so both need "
            "the same --tp (--kv-transfer tcp re-shards any pairing)")


# (peer ranks, request id, source blocks, destination blocks) -> bytes moved by all ranks,
# once every rank's read has landed
RankPull = Callable[[list[RankAgent], str, list[int], list[int]], Awaitable[int]]


class ShardedNixlBackend(KVTransferBackend):
    """The leader's view of a tensor-parallel worker's per-rank agents. `pull` checks the
    peer's ranks against ours and hands the reads to `pull_ranks`, which runs them on
    every rank at once (engine.tensor_parallel.TPComm.nixl_pull)."""

    name = "nixl"

    def __init__(self, leader: NixlBackend, ranks: list[RankAgent],
                 fetch_metadata: MetadataFetcher, pull_ranks: RankPull) -> None:
        super().__init__(leader.kv_cache)
        self._leader = leader
        self._ranks = ranks
        self._fetch_metadata = fetch_metadata
        self._pull_ranks = pull_ranks
        self._peer_ranks: dict[str, list[RankAgent]] = {}

    @property
    def agent_name(self) -> str:
        return self._leader.agent_name

    def metadata(self) -> bytes:
        return pack_rank_agents(self._ranks)

    async def pull(self, peer: PeerInfo, request_id: str, src_block_ids: Sequence[int],
                   dst_block_ids: Sequence[int]) -> int:
        if not src_block_ids:
            return 0
        ranks = self._peer_ranks.get(peer.agent_name)
        if ranks is None:
            ranks = unpack_rank_agents(await self._fetch_metadata(peer.address))
            if len(ranks) != len(self._ranks):
                raise ValueError(tp_mismatch(len(ranks), len(self._ranks)))
            for mine, theirs in zip(self._ranks, ranks):
                if mine.block_bytes != theirs.block_bytes:
                    raise ValueError(f"peer rank blocks are {theirs.block_bytes} bytes, ours "
                                     f"{mine.block_bytes}: layouts differ")
            self._peer_ranks[peer.agent_name] = ranks
        return await self._pull_ranks(ranks, request_id, list(src_block_ids),
                                      list(dst_block_ids))

    def close(self) -> None:
        self._leader.close()
