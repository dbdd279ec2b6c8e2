"""KV-aware worker choice: follow every worker's KV event stream into a prefix index, and
score workers for a request with `router.policy` (overlap credit minus load)."""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from engine.rpc import worker_pb2 as pb
from kvtransfer.events import KVEventBatch, Tier
from kvtransfer.hashing import block_hashes
from router.errors import WorkerUnavailableError
from router.policy import PolicyWeights, WorkerLoad, choose
from router.prefix_index import InMemoryPrefixIndex, Overlap
from router.workers import WorkerHandle, WorkerPool

log = logging.getLogger(__name__)


class KVRouter:
    def __init__(self, pool: WorkerPool, weights: PolicyWeights | None = None,
                 seed: int | None = None) -> None:
        self.pool = pool
        self.index = InMemoryPrefixIndex()
        self.weights = weights or PolicyWeights()
        self.rng = random.Random(seed)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow(w)) for w in self.pool.all]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _follow(self, w: WorkerHandle) -> None:
        """Snapshot first, then batches; any break (gap, restart, dead stream) means
        reconnecting, which starts with a fresh snapshot."""
        while True:
            try:
                async for msg in w.stub.KVEvents(pb.KVEventsRequest()):
                    if msg.snapshot:
                        self.index.resync(w.address, msg.instance_id, msg.last_event_id,
                                          [(h, Tier.DEVICE) for h in msg.block_hashes])
                        continue
                    batch = KVEventBatch.decode(msg.batch)
                    batch.worker_id = w.address
                    if not self.index.apply(batch):
                        break
            except grpc.aio.AioRpcError as e:
                log.info("KV events of %s interrupted (%s)", w.address, e.code())
                self.index.remove_worker(w.address)
            await asyncio.sleep(0.5)

    def block_size(self) -> int:
        sizes = [w.status.block_size for w in self.pool.all if w.status]
        return sizes[0] if sizes else 16

    def overlaps(self, prompt: list[int]) -> tuple[dict[str, Overlap], int]:
        bs = self.block_size()
        return self.index.lookup(block_hashes(prompt, bs)), bs

    def pick(self, role: str, overlaps: dict[str, Overlap], block_size: int,
             exclude: set[str]) -> WorkerHandle:
        pool = self.pool.prefill if role == "prefill" else self.pool.decode
        live = {w.address: w for w in pool if w.healthy and w.address not in exclude}
        if not live:
            raise WorkerUnavailableError(f"no healthy {role} worker")
        loads = {a: _load(w) for a, w in live.items()}
        picked, _ = choose(list(live), overlaps, loads, block_size, self.weights, self.rng)
        return live[picked]


def _load(w: WorkerHandle) -> WorkerLoad:
    s = w.status
    if s is None:
        return WorkerLoad()
    # The router's own in-flight count reacts faster than the polled status.
    return WorkerLoad(queued_prefill_tokens=s.queued_prefill_tokens,
                      active_blocks=s.used_blocks + 4 * w.in_flight,
                      cached_blocks=s.cached_blocks, total_blocks=s.total_blocks)
