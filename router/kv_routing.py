"""KV-aware worker choice: follow every worker's KV event stream into a prefix index, and
score workers for a request with `router.policy` (overlap credit minus load)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import grpc
from redis.exceptions import RedisError

from engine.rpc import worker_pb2 as pb
from kvtransfer.events import KVEventBatch, Tier
from kvtransfer.hashing import block_hashes
from router.errors import WorkerUnavailableError
from router.policy import PolicyWeights, WorkerLoad, choose
from router.prefix_index import InMemoryPrefixIndex, Overlap
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


class MemoryIndex:
    """The in-memory index behind the same async interface as the Redis one."""

    def __init__(self) -> None:
        self.index = InMemoryPrefixIndex()

    async def apply(self, batch: KVEventBatch) -> bool:
        return self.index.apply(batch)

    async def resync(self, worker_id, instance_id, last_event_id, blocks) -> None:
        self.index.resync(worker_id, instance_id, last_event_id, blocks)

    async def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)

    async def lookup(self, hashes: list[int]) -> dict[str, Overlap]:
        return self.index.lookup(hashes)

    async def renew_lease(self, worker_id: str) -> None:
        pass

    async def close(self) -> None:
        pass


def make_index(spec: str):
    """`memory` or `redis://host:port[/db]`."""
    if spec == "memory":
        return MemoryIndex()
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from router.redis_index import RedisPrefixIndex

        return RedisPrefixIndex(spec)
    raise ValueError(f"--index must be 'memory' or redis://HOST:PORT, got {spec!r}")


class KVRouter:
    def __init__(self, pool: WorkerPool, index_spec: str = "memory",
                 weights: PolicyWeights | None = None) -> None:
        self.pool = pool
        self.index = make_index(index_spec)
        self.weights = weights or PolicyWeights()
        self.index_ok = True
        self._followers: dict[str, asyncio.Task] = {}  # worker address -> its follower

    def start(self) -> None:
        for w in self.pool.all:
            self.follow(w)

    def follow(self, w: WorkerHandle) -> None:
        """Index this worker's blocks from now on (snapshot, then its event batches)."""
        self._followers[w.address] = asyncio.create_task(self._follow(w))

    async def unfollow(self, address: str) -> None:
        """A worker that left: stop following it and forget its blocks."""
        if (task := self._followers.pop(address, None)) is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(OSError, RedisError):
            await self.index.remove_worker(address)

    def restart_followers(self) -> None:
        for t in self._followers.values():
            t.cancel()
        self._followers.clear()
        self.start()

    async def stop(self) -> None:
        tasks = list(self._followers.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.index.close()

    async def _follow(self, w: WorkerHandle) -> None:
        """Snapshot first, then batches; any break (gap, restart, dead stream) means
        reconnecting, which starts with a fresh snapshot."""
        while True:
            call = None
            try:
                call = w.stub.KVEvents(pb.KVEventsRequest())
                async for msg in call:
                    if msg.snapshot:
                        await self.index.resync(w.address, msg.instance_id,
                                                msg.last_event_id,
                                                [(h, Tier.DEVICE) for h in msg.block_hashes])
                        continue
                    batch = KVEventBatch.decode(msg.batch)
                    batch.worker_id = w.address
                    if not await self.index.apply(batch):
                        break
            except grpc.aio.AioRpcError as e:
                log.info("KV events of %s interrupted (%s)", w.address, e.code())
                with contextlib.suppress(Exception):
                    await self.index.remove_worker(w.address)
            except (OSError, RedisError) as e:  # the index store is down: resync later
                log.warning("prefix index unavailable while following %s: %s", w.address, e)
            finally:
                if call is not None:
                    call.cancel()
            await asyncio.sleep(0.5)

    def block_size(self) -> int:
        sizes = [w.status.block_size for w in self.pool.all if w.status]
        return sizes[0] if sizes else 16

    async def overlaps(self, prompt: list[int]) -> tuple[dict[str, Overlap], int]:
        """Per-worker prefix overlap; empty (load-only routing) while the index is down."""
        bs = self.block_size()
        try:
            found = await self.index.lookup(block_hashes(prompt, bs))
        except (OSError, RedisError) as e:
            if self.index_ok:
                log.warning("prefix index unavailable, routing by load only: %s", e)
            self.index_ok = False
            return {}, bs
        if not self.index_ok:
            # The store came back, maybe empty: follow every worker afresh (snapshots).
            log.info("prefix index is back: resyncing from the workers")
            self.restart_followers()
        self.index_ok = True
        return found, bs

    async def renew_leases(self) -> None:
        with contextlib.suppress(OSError, RedisError):
            for w in self.pool.all:
                if w.healthy:
                    await self.index.renew_lease(w.address)

    def pick(self, role: str, overlaps: dict[str, Overlap], block_size: int,
             exclude: set[str], tie_key: int = 0) -> tuple[WorkerHandle, str]:
        """The worker for a request, and how it relates to the prefix (`outcome`)."""
        pool = self.pool.prefill if role == "prefill" else self.pool.decode
        live = {w.address: w for w in pool if w.healthy and w.address not in exclude}
        if not live:
            raise WorkerUnavailableError(f"no healthy {role} worker")
        loads = {a: _load(w) for a, w in live.items()}
        # Ties are broken by a generator seeded from the request, not by position: every
        # router replica breaks the same tie the same way, and no worker is favoured.
        rng = random.Random(tie_key)
        picked, _ = choose(sorted(live), overlaps, loads, block_size, self.weights, rng)
        return live[picked], self.outcome(picked, list(live), overlaps)

    @staticmethod
    def outcome(picked: str, candidates: list[str], overlaps: dict[str, Overlap]) -> str:
        """How a pick relates to the prefix: "new_prefix" (no candidate holds any of it),
        "best_prefix" (the pick holds as much as any candidate) or "diverted" (load sent
        it away from a worker holding more), so operators see what load costs in hits."""
        best = max((overlaps[c].total for c in candidates if c in overlaps), default=0)
        if best == 0:
            return "new_prefix"
        got = overlaps[picked].total if picked in overlaps else 0
        return "best_prefix" if got >= best else "diverted"


def _load(w: WorkerHandle) -> WorkerLoad:
    s = w.status
    if s is None:
        return WorkerLoad(queued_prefill_tokens=w.pending_prefill_tokens)
    # Queued prefill comes from the router's own exact count, not the polled status: a
    # status up to 0.5 s old can still show a prefill that has finished, and that stale
    # penalty would send a request away from the worker holding its prefix. (With several
    # router replicas each counts its own traffic.)
    # Likewise blocks in use: less those of this router's requests that ended since.
    used = max(0, s.used_blocks - w.blocks_freed_since_status)
    return WorkerLoad(queued_prefill_tokens=w.pending_prefill_tokens,
                      active_blocks=used + 4 * w.in_flight,
                      cached_blocks=s.cached_blocks, total_blocks=s.total_blocks)
