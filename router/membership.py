"""The router's worker set under discovery (`--discover redis://...`, cluster/discovery.py):
each second, workers whose lease appeared join the pool (and the KV index follows their
events); workers whose lease is gone, or that came back in another role, leave it: no new
request goes there, the requests already there finish, and their blocks leave the index.
A worker whose lease is gone but which still answers stays `grace_s` (or its lease, if
longer) more: Redis restarted empty, and every worker re-registers within a third of its
lease. Dead and draining workers (`baton worker --drain-seconds`) leave at once. Workers
given on the command line stay whatever Redis says."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from cluster.discovery import Discovery, Registration
from router.kv_routing import KVRouter
from router.metrics import RouterMetrics
from router.workers import WorkerPool

log = logging.getLogger(__name__)


async def retire(pool: WorkerPool, kv: KVRouter | None, metrics: RouterMetrics,
                 address: str) -> None:
    """Take a worker out of the pool: nothing new goes there, its requests finish, its
    blocks leave the index and its metric series go."""
    w = pool.remove(address)
    if w is None:
        return
    log.info("%s worker %s left", w.role, address)
    metrics.forget_worker(address, w.role)
    if kv is not None:
        await kv.unfollow(address)


def admit(pool: WorkerPool, kv: KVRouter | None, prefill: list[str], decode: list[str]) -> None:
    """Add workers to the pool (healthy from the next status poll); the index follows them."""
    for w in pool.add_workers(prefill, decode):
        log.info("%s worker %s joined", w.role, w.address)
        if kv is not None:
            kv.follow(w)


class Membership:
    def __init__(self, url: str, pool: WorkerPool, kv: KVRouter | None,
                 metrics: RouterMetrics, fixed: set[str], period_s: float = 1.0,
                 grace_s: float = 10.0) -> None:
        self.discovery = Discovery(url)
        self.pool, self.kv, self.metrics = pool, kv, metrics
        self.fixed = fixed
        self.period_s = period_s
        self.grace_s = grace_s
        self._missing_since: dict[str, float] = {}
        self._lease_s: dict[str, float] = {}  # the lease each worker registered with
        self.reachable = True
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Joins the workers registered now; if Redis is not up yet (one helm install
        starts both), the loop keeps asking."""
        await self._sync()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.discovery.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self._sync()
            except Exception:  # never let discovery stop for good
                log.exception("discovery: sync failed; trying again")

    async def _sync(self) -> None:
        try:
            live = await self.discovery.live()
        except (OSError, RedisError) as e:
            if self.reachable:
                log.warning("discovery: Redis unreachable, keeping the known workers: %s", e)
            self.reachable = False
            return
        if not self.reachable:
            log.info("discovery: Redis is reachable")
        self.reachable = True
        await self.join_and_leave(live)

    async def join_and_leave(self, registrations: list[Registration]) -> None:
        live = {r.address: r for r in registrations}
        known = {w.address: w for w in self.pool.all}
        now = time.monotonic()
        for address in [a for a in self._missing_since if a in live or a not in known]:
            del self._missing_since[address]
        self._lease_s.update((a, r.lease_seconds) for a, r in live.items())
        for address, w in list(known.items()):
            reg = live.get(address)
            if address in self.fixed or (reg is not None and reg.pool == w.role):
                continue
            if reg is None and w.healthy:  # still answers: leave it a grace period
                since = self._missing_since.setdefault(address, now)
                if now - since < max(self.grace_s, self._lease_s.get(address, 0.0)):
                    continue
            self._missing_since.pop(address, None)
            self._lease_s.pop(address, None)
            await retire(self.pool, self.kv, self.metrics, address)
            del known[address]
        new = [r for a, r in live.items() if a not in known]
        if new:
            admit(self.pool, self.kv, [r.address for r in new if r.pool == "prefill"],
                  [r.address for r in new if r.pool == "decode"])
