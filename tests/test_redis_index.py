"""The Redis-backed prefix index against a real Valkey server: the same behaviour as the
in-memory one, idempotent under several appliers, and leases that expire."""

from __future__ import annotations

import asyncio
import random
import time

import redis

from kvtransfer.events import CLEARED, REMOVED, STORED, KVEvent, KVEventBatch, Tier
from kvtransfer.hashing import block_hashes
from router.prefix_index import InMemoryPrefixIndex, Overlap
from router.redis_index import RedisPrefixIndex
from tests.kv_event_fuzz import random_events, random_snapshot

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
        await idx.renew_lease("w9")  # live but never synced: holds nothing
        assert (await idx.lookup(H))["w9"] == Overlap()
        await idx.close()

    run(scenario())


def test_many_workers_and_reused_slots(redis_url):
    """More workers than distinct answers fit in one byte of the reply; a removed worker's
    slot is reused; the answers equal the in-memory index's."""
    url, _ = redis_url
    pool = block_hashes(list(range(16 * 300)), 16)

    async def scenario():
        idx, mem = RedisPrefixIndex(url), InMemoryPrefixIndex()
        for i in range(300):
            snap = [(h, Tier.DEVICE if i % 7 else Tier.HOST) for h in pool[: i % 290]]
            mem.resync(f"w{i}", "i1", 0, snap)
            await idx.resync(f"w{i}", "i1", 0, snap)
        got = await idx.lookup(pool)
        assert got == mem.lookup(pool) and got["w289"] == Overlap(device=289)
        assert len(set(got.values())) > 256
        for w in ("w3", "w10"):
            mem.remove_worker(w)
            await idx.remove_worker(w)
        mem.resync("w300", "i1", 0, [(h, Tier.DISK) for h in pool[:5]])
        await idx.resync("w300", "i1", 0, [(h, Tier.DISK) for h in pool[:5]])
        got = await idx.lookup(pool[:200])
        assert got == mem.lookup(pool[:200]) and got["w300"] == Overlap(disk=5)
        assert "w3" not in got
        check_layout(url)
        await idx.close()

    run(scenario())


def check_layout(url: str) -> None:
    """The invariants of router/redis_index.py: byte p of a block's value is non-zero iff
    the key is in the set of slot p's worker; no value is all zeros; one slot per worker
    and at most one lease per slot."""
    r = redis.Redis.from_url(url)
    slots = {w.decode(): int(p) for w, p in r.hgetall("baton:slots").items()}
    assert len(set(slots.values())) == len(slots)
    leases = [x.decode().split(" ", 1) for x in r.zrange("baton:leases", 0, -1)]
    assert all(slots[w] == int(p) for p, w in leases) and len(leases) == len(slots)
    roster = (r.get("baton:roster") or b"").decode()
    assert sorted(roster.split("\n") if roster else []) == sorted(f"{p} {w}" for w, p in
                                                                  slots.items())
    held: dict[int, set[bytes]] = {}
    for key in r.scan_iter(b"baton:b:*"):
        v = r.get(key)
        assert len(key) == 16 and any(v) and max(v) < 8, (key, v)
        for p, mask in enumerate(v):
            if mask:
                held.setdefault(p, set()).add(key)
    for w, p in slots.items():
        assert r.smembers(f"baton:wblk:{w}") == held.pop(p, set()), w
    assert not held, held  # nothing left behind by a freed slot
    r.close()


def test_random_events_match_the_in_memory_index(redis_url):
    """Stores, removals, clears in every tier, resyncs, removals and slot reuse, applied
    through two router replicas (sometimes both): the same answers as the in-memory index."""
    url, _ = redis_url
    rng = random.Random(1)
    pool = block_hashes(list(range(16 * 24)), 16)

    async def scenario():
        routers = [RedisPrefixIndex(url), RedisPrefixIndex(url)]
        mem, eids = InMemoryPrefixIndex(), {}
        for step in range(400):
            w = f"w{rng.randrange(10)}"
            r = rng.random()
            if w not in eids or r < 0.02:
                snap = random_snapshot(rng, pool)
                mem.resync(w, "i1", 0, snap)
                await rng.choice(routers).resync(w, "i1", 0, snap)
                eids[w] = 0
            elif r < 0.05:
                mem.remove_worker(w)
                await rng.choice(routers).remove_worker(w)
                del eids[w]
            else:
                events = random_events(rng, pool)
                eids[w] += 1
                assert mem.apply(b(w, eids[w], *events))
                for idx in rng.sample(routers, rng.randint(1, 2)):
                    assert await idx.apply(b(w, eids[w], *events))
            if step % 10 == 0:
                check_layout(url)
            query = pool[: rng.randrange(len(pool) + 1)]
            if query and rng.random() < 0.3:
                query[rng.randrange(len(query))] = 12345  # a block nobody holds
            assert await rng.choice(routers).lookup(query) == mem.lookup(query)
        check_layout(url)
        assert any(o.host or o.disk for o in mem.lookup(pool).values())
        for idx in routers:
            await idx.close()

    run(scenario())
