"""The Redis-backed prefix index against a real Valkey server: the same behaviour as the
in-memory one, idempotent under several appliers, and leases that expire."""

from __future__ import annotations

import asyncio
import time

from kvtransfer.events import CLEARED, REMOVED, STORED, KVEvent, KVEventBatch, Tier
from kvtransfer.hashing import block_hashes
from router.prefix_index import Overlap
from router.redis_index import RedisPrefixIndex

H = block_hashes(list(range(64)), 16)


def b(worker: str, eid: int, *events: KVEvent, instance: str = "i1") -> KVEventBatch:
    return KVEventBatch(worker, instance, eid, list(events))


def run(coro):
    return asyncio.run(coro)


def test_events_lookup_gaps_and_tiers(redis_url):
    url, _ = redis_url

    async def scenario():
        idx = RedisPrefixIndex(url)
        other = RedisPrefixIndex(url)  # a second router replica
        await idx.resync("w1", "i1", 0, [])
        await idx.resync("w2", "i1", 0, [])
        assert await idx.apply(b("w1", 1, KVEvent(STORED, H[:3])))
        assert await other.apply(b("w1", 1, KVEvent(STORED, H[:3])))  # duplicate: no-op
        assert await idx.apply(b("w2", 1, KVEvent(STORED, [H[0]], tier=Tier.HOST)))
        got = await other.lookup(H)
        assert got["w1"] == Overlap(device=3) and got["w2"] == Overlap(host=1)
        assert not await idx.apply(b("w1", 3, KVEvent(STORED, H[3:])))  # gap
        assert not await idx.apply(b("w1", 2, KVEvent(STORED, H[3:]), instance="i2"))
        assert await idx.apply(b("w1", 2, KVEvent(REMOVED, [H[1]])))
        assert (await idx.lookup(H))["w1"].total == 1
        assert await idx.apply(b("w1", 3, KVEvent(CLEARED)))
        assert (await idx.lookup(H))["w1"].total == 0
        await idx.resync("w1", "i2", 7, [(h, Tier.DEVICE) for h in H])
        assert (await idx.lookup(H))["w1"].total == 4
        await idx.remove_worker("w1")
        assert "w1" not in await idx.lookup(H)
        await idx.close()
        await other.close()

    run(scenario())


def test_expired_lease_hides_a_worker(redis_url):
    url, _ = redis_url

    async def scenario():
        idx = RedisPrefixIndex(url, lease_seconds=0.3)
        await idx.resync("w1", "i1", 0, [(h, Tier.DEVICE) for h in H])
        assert (await idx.lookup(H))["w1"].total == 4
        time.sleep(0.4)
        assert "w1" not in await idx.lookup(H)
        assert await idx.expired_workers() == ["w1"]
        await idx.renew_lease("w1")
        assert (await idx.lookup(H))["w1"].total == 4
        await idx.close()

    run(scenario())
