"""The nccl backend: KV blocks move GPU to GPU over NCCL send/recv (through CuPy), one
2-rank communicator per (prefill worker, decode worker) pair, made on their first pull.

Control travels over the workers' gRPC channel (`ControlPlane`); data over `NcclLink`s
(nccl_link.py). Connecting: the decode worker makes a unique id and sends it with
`NcclConnect` while it joins the communicator itself; the prefill worker joins on its side
and answers once joined (joining blocks until both sides are in, so both run it on their
link threads). A pull: the decode worker sends `NcclSend` (request id, source blocks cut
into runs, the link's transfer count); the prefill worker checks the blocks are held for
that request, queues one send per run and answers; then the decode worker queues the
matching receives. Pulls over a link are serialized on the decode side and numbered, so
both sides issue them in the same order. Every wait is bounded: a peer that stops
answering gets its link aborted (ncclCommAbort ends kernels stuck on it), and the next
pull to it makes a new link."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from kvtransfer.transfer.base import (
    KVTransferBackend,
    NcclConnector,
    NcclSendRequester,
    PeerInfo,
    PlanRejected,
    SendPlan,
    coalesce,
    wait_out,
)
from kvtransfer.transfer.nccl_link import (
    RECEIVER,
    SENDER,
    LinkBroken,
    NcclLink,
    Runs,
    compute_marker,
    cupy_nccl_reason,
    new_unique_id,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 60.0  # both sides joining a communicator
RPC_TIMEOUT_S = 30.0  # the prefill side checking a plan and queuing its sends
ABORT_TIMEOUT_S = 10.0
# After a failed connect to a peer, further connects to it fail at once for this long,
# doubling per failure up to the cap: a joiner blocked in ncclCommInitRank cannot be
# cancelled (there is no communicator to abort yet), so each attempt at a dead peer can
# leave one thread behind, and this bounds how fast they pile up.
CONNECT_BACKOFF_S = (2.0, 120.0)
# A transfer may take this long plus one second per GB (far below NVLink or network speed)
# before the link counts as dead.
TRANSFER_TIMEOUT_S = 30.0
SLOWEST_BYTES_PER_S = 1e9
NCCL_MIN_VERSION = 2700  # ncclSend/ncclRecv


def transfer_timeout(nbytes: int) -> float:
    return TRANSFER_TIMEOUT_S + nbytes / SLOWEST_BYTES_PER_S


def unavailable_reason(kv_cache: torch.Tensor) -> str | None:
    """Why this worker cannot use NCCL transfers, or None."""
    if not kv_cache.is_cuda:
        return (f"NCCL moves KV between GPUs, but this worker's KV cache is on "
                f"{kv_cache.device.type} (use --device cuda, or --kv-transfer nixl/tcp)")
    if (reason := cupy_nccl_reason()) is not None:
        return reason
    from cupy.cuda import nccl

    version = nccl.get_version()
    if version < NCCL_MIN_VERSION:
        return f"NCCL {version} has no send/recv (2.7 or later is needed)"
    return None


def _daemon(fn: Callable[[], T]) -> asyncio.Future[T]:
    """`fn()` on a daemon thread: a call that may hang on a dead peer must not hold up
    the executor or the process's exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result, error) -> None:
        if not fut.done():
            fut.set_exception(error) if error is not None else fut.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = fn()
        except BaseException as e:
            error = e
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="nccl-call", daemon=True).start()
    return fut


async def _bounded(aw, timeout: float, what: str):
    """Await for at most `timeout` seconds. On timeout a coroutine is cancelled; a link's
    future is left alone (cancelling a queued transfer would make its link skip it)."""
    if isinstance(aw, concurrent.futures.Future):
        aw = asyncio.shield(asyncio.wrap_future(aw))
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError as e:
        raise TimeoutError(f"{what}: no answer in {timeout:.0f} s") from e


class ConnectBackoff:
    """When the decode side may try to connect to a prefill worker again."""

    def __init__(self, first: float = CONNECT_BACKOFF_S[0],
                 cap: float = CONNECT_BACKOFF_S[1]) -> None:
        self.first, self.cap = first, cap
        self._peers: dict[str, tuple[float, float]] = {}  # peer -> (retry at, last wait)

    def check(self, peer: str, address: str, now: float) -> None:
        retry_at, wait = self._peers.get(peer, (0.0, 0.0))
        if now < retry_at:
            raise LinkBroken(f"NCCL connect to {peer} ({address}) failed; not retried for "
                             f"another {retry_at - now:.0f} s (backoff {wait:.0f} s)")

    def failed(self, peer: str, now: float) -> float:
        """Records a failed connect; returns the wait before the next attempt."""
        _, wait = self._peers.get(peer, (0.0, 0.0))
        wait = min(self.cap, max(self.first, 2 * wait))
        self._peers[peer] = (now + wait, wait)
        return wait

    def succeeded(self, peer: str) -> None:
        self._peers.pop(peer, None)


@dataclass
class _Link:
    link: NcclLink
    seq: int = 0  # transfers issued over it so far
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # decode side: one pull at a time


class NcclBackend(KVTransferBackend):
    name = "nccl"

    def __init__(self, kv_cache: torch.Tensor, agent_name: str, connect: NcclConnector,
                 request_send: NcclSendRequester) -> None:
        reason = unavailable_reason(kv_cache)
        if reason is not None:
            raise RuntimeError(reason)
        super().__init__(kv_cache)
        self._name = agent_name
        self._device = kv_cache.device.index or 0
        # The engine computes on the device's default stream.
        self._compute_stream = (torch.cuda.default_stream(kv_cache.device).cuda_stream
                                if kv_cache.is_cuda else 0)
        self._connect = connect
        self._request_send = request_send
        self._pulls: dict[str, _Link] = {}  # decode side, by prefill worker name
        self._serves: dict[str, _Link] = {}  # prefill side, by decode worker name
        self._connecting: dict[str, asyncio.Lock] = {}  # decode side, per prefill worker
        self._backoff = ConnectBackoff()
        self._watchers: set[asyncio.Task] = set()

    @property
    def agent_name(self) -> str:
        return self._name

    def _new_link(self, rank: int, unique_id: bytes, peer: str) -> NcclLink:
        role = "send" if rank == SENDER else "recv"
        return NcclLink(rank, unique_id, self._device, self.base_address, self.block_bytes,
                        name=f"{role}-{peer}", compute_stream=self._compute_stream,
                        kv_cache=self.kv_cache)

    async def _drop(self, table: dict[str, _Link], key: str, entry: _Link) -> None:
        if table.get(key) is entry:
            del table[key]
        try:
            await _bounded(_daemon(entry.link.abort), ABORT_TIMEOUT_S, f"aborting {key}")
        except TimeoutError as e:
            log.error("NCCL link to %s: %s", key, e)

    # -- decode side ------------------------------------------------------------------

    async def pull(self, peer: PeerInfo, request_id: str, src_block_ids: Sequence[int],
                   dst_block_ids: Sequence[int]) -> int:
        if not src_block_ids:
            return 0
        self.check_layout(peer)
        runs = coalesce(src_block_ids, dst_block_ids)
        nbytes = sum(r.count for r in runs) * self.block_bytes
        entry = await self._link_to(peer)
        async with entry.lock:
            if entry.link.broken:
                await self._drop(self._pulls, peer.agent_name, entry)
                raise LinkBroken(f"NCCL link to {peer.agent_name} broke; the next pull "
                                 "reconnects")
            plan = SendPlan(request_id, self._name, entry.seq, tuple(src_block_ids),
                            tuple(r.count for r in runs))
            try:
                await _bounded(self._request_send(peer.address, plan), RPC_TIMEOUT_S,
                               f"NcclSend to {peer.address}")
            except PlanRejected:
                raise  # nothing was queued on either side
            except BaseException:  # the sends may or may not be queued over there
                await self._drop(self._pulls, peer.agent_name, entry)
                raise
            entry.seq += 1
            recv = entry.link.submit([(r.dst_start, r.count) for r in runs])
            try:
                return await _bounded(recv, transfer_timeout(nbytes),
                                      f"NCCL receive of {request_id} from {peer.address}")
            except BaseException:
                # Abort, then wait for the link thread to stop, before the caller frees
                # the destination blocks: it stops once what it queued has run out, and
                # until then a staged receive's scatter may still write into them.
                await self._drop(self._pulls, peer.agent_name, entry)
                stopped = await wait_out(
                    lambda: asyncio.to_thread(entry.link.wait_closed, ABORT_TIMEOUT_S))
                if not stopped:
                    log.error("NCCL link to %s did not stop in %.0f s after its abort",
                              peer.agent_name, ABORT_TIMEOUT_S)
                raise

    async def _link_to(self, peer: PeerInfo) -> _Link:
        entry = self._pulls.get(peer.agent_name)
        if entry is not None and not entry.link.broken:
            return entry
        async with self._connecting.setdefault(peer.agent_name, asyncio.Lock()):
            entry = self._pulls.get(peer.agent_name)
            if entry is not None and not entry.link.broken:
                return entry
            if entry is not None:
                await self._drop(self._pulls, peer.agent_name, entry)
            self._backoff.check(peer.agent_name, peer.address, time.monotonic())
            uid = await _bounded(_daemon(new_unique_id), CONNECT_TIMEOUT_S, "ncclGetUniqueId")
            entry = _Link(self._new_link(RECEIVER, uid, peer.agent_name))
            try:
                joined = asyncio.gather(asyncio.wrap_future(entry.link.ready),
                                        self._connect(peer.address, self._name, uid))
                await _bounded(joined, CONNECT_TIMEOUT_S, f"NCCL connect to {peer.address}")
            except BaseException as e:
                # Cancelled too: the joiner thread is left behind all the same, so a peer
                # that never joins must not be retried at the pace of cancelled callers.
                wait = self._backoff.failed(peer.agent_name, time.monotonic())
                log.warning("NCCL connect to %s (%s) failed (%r); next try in %.0f s",
                            peer.agent_name, peer.address, e, wait)
                await self._drop({}, peer.agent_name, entry)
                raise
            self._backoff.succeeded(peer.agent_name)
            log.info("NCCL link to %s (%s) up", peer.agent_name, peer.address)
            self._pulls[peer.agent_name] = entry
            return entry

    # -- prefill side -----------------------------------------------------------------

    async def accept(self, peer: str, unique_id: bytes) -> None:
        """NcclConnect: join the communicator decode worker `peer` made (replacing any
        older link to it); returns once joined."""
        old = self._serves.pop(peer, None)
        if old is not None:
            await self._drop({}, peer, old)
        entry = _Link(self._new_link(SENDER, unique_id, peer))
        self._serves[peer] = entry
        try:
            await _bounded(entry.link.ready, CONNECT_TIMEOUT_S, f"NCCL join with {peer}")
        except BaseException:
            await self._drop(self._serves, peer, entry)
            raise
        log.info("NCCL link from %s up", peer)

    def compute_marker(self):
        """See nccl_link.compute_marker: call it under the engine lock."""
        return compute_marker(self._device, self._compute_stream)

    def queue_send(self, peer: str, seq: int, runs: Runs, after=None) -> None:
        """NcclSend, once the caller has checked the blocks are held: queue the sends (to
        start after event `after`) and return at once; the decode side posts its receives
        after this. A send that does not finish in time aborts the link."""
        entry = self._serves.get(peer)
        if entry is None or entry.link.broken:
            raise LinkBroken(f"no NCCL link from {peer}: it must connect again")
        if seq != entry.seq:
            self._watch(self._drop(self._serves, peer, entry))
            raise LinkBroken(f"transfer {seq} from {peer} arrived when {entry.seq} was due")
        entry.seq += 1
        nbytes = sum(n for _, n in runs) * self.block_bytes
        done = entry.link.submit(runs, after)
        self._watch(self._finish_send(peer, entry, done, nbytes))

    async def _finish_send(self, peer: str, entry: _Link, done, nbytes: int) -> None:
        try:
            await _bounded(done, transfer_timeout(nbytes), f"NCCL send to {peer}")
        except Exception as e:
            log.warning("NCCL link to %s dropped: %s", peer, e)
            await self._drop(self._serves, peer, entry)

    def _watch(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def close(self) -> None:
        links = [e.link for e in (*self._pulls.values(), *self._serves.values())]
        self._pulls.clear()
        self._serves.clear()
        threads = [threading.Thread(target=link.abort, daemon=True) for link in links]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=ABORT_TIMEOUT_S / max(len(threads), 1))
