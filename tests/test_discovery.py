"""Discovery through Redis leases, against a real Valkey server: registrations appear, a
lapsed lease vanishes (and is pruned), a clean stop leaves at once; the router's pool
follows, keeping fixed workers and the requests already on a worker that left."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from cluster.discovery import MEMBERS, Discovery, Registrar, Registration, lease_key
from router.membership import Membership
from router.metrics import RouterMetrics
from router.workers import WorkerPool


def test_registrations_live_lapse_and_leave(redis_url) -> None:
    url, _ = redis_url

    async def run() -> None:
        p = Registrar(url, Registration("10.0.0.1:7001", "prefill", 1.0))
        d = Registrar(url, Registration("10.0.0.2:7002", "both", 1.0))
        disc = Discovery(url)
        await p.renew()  # registered, but nothing renews it: it lapses
        await d.register()
        await asyncio.sleep(0.2)
        live = await disc.live()
        assert live == [Registration("10.0.0.1:7001", "prefill", 1.0),
                        Registration("10.0.0.2:7002", "both", 1.0)]
        assert [r.pool for r in live] == ["prefill", "decode"]
        await asyncio.sleep(1.3)  # past p's lease; d renewed itself meanwhile
        assert await disc.live() == [Registration("10.0.0.2:7002", "both", 1.0)]
        r = aioredis.from_url(url)
        assert await r.smembers(MEMBERS) == {b"10.0.0.2:7002"}  # the lapsed one pruned
        await d.deregister()  # a clean stop: gone at once, not a lease later
        assert await disc.live() == []
        assert not await r.exists(lease_key("10.0.0.2:7002"))
        await r.aclose()
        await disc.close()
        await p.r.aclose()

    asyncio.run(run())


def test_bad_registrations(redis_url) -> None:
    url, _ = redis_url
    with pytest.raises(ValueError, match="role 'encode'"):
        Registration("h:1", "encode")
    with pytest.raises(ValueError, match="at least 1s"):
        Registrar(url, Registration("h:1", "decode", lease_seconds=0.5))

    async def garbage() -> None:  # someone else's value under our key: skipped, not fatal
        r = aioredis.from_url(url)
        await r.sadd(MEMBERS, "h:2")
        await r.set(lease_key("h:2"), b"{not json")
        disc = Discovery(url)
        assert await disc.live() == []
        await disc.close()
        await r.aclose()

    asyncio.run(garbage())


def test_the_pool_follows_the_leases(redis_url) -> None:
    url, _ = redis_url

    async def run() -> None:
        pool = WorkerPool()
        pool.add_workers([], ["127.0.0.1:1"])  # fixed on the command line
        m = Membership(url, pool, None, RouterMetrics(), fixed={"127.0.0.1:1"})
        a, b = Registration("127.0.0.1:2", "prefill"), Registration("127.0.0.1:3", "both")
        await m.join_and_leave([a, b])
        assert [w.address for w in pool.prefill] == ["127.0.0.1:2"]
        assert [w.address for w in pool.decode] == ["127.0.0.1:1", "127.0.0.1:3"]
        busy = pool.decode[1]
        busy.in_flight = 1  # a request is streaming from it when its lease goes
        await m.join_and_leave([a])
        assert [w.address for w in pool.decode] == ["127.0.0.1:1"]  # fixed: stays
        assert pool.retired == [busy] and not busy.healthy
        await pool.close_idle_retired()
        assert pool.retired == [busy]  # its request goes on over the open channel
        busy.in_flight = 0
        await pool.close_idle_retired()
        assert pool.retired == []
        # A worker that still answers outlives its vanished lease by the grace period, or
        # by its lease if longer (Redis restarted empty; its next renewal brings it back).
        m.grace_s = 0.3
        await m.join_and_leave([Registration("127.0.0.1:4", "both", lease_seconds=1.0)])
        pool.decode[-1].healthy = True
        await m.join_and_leave([])
        await asyncio.sleep(0.4)  # past grace_s, within the lease
        await m.join_and_leave([])
        assert [w.address for w in pool.decode] == ["127.0.0.1:1", "127.0.0.1:4"]
        await asyncio.sleep(0.7)
        await m.join_and_leave([])
        assert [w.address for w in pool.decode] == ["127.0.0.1:1"]
        # Back in another role (restarted as a decode worker): re-joins as that.
        await m.join_and_leave([Registration("127.0.0.1:2", "decode")])
        assert pool.prefill == []
        assert [w.address for w in pool.decode] == ["127.0.0.1:1", "127.0.0.1:2"]
        await m.discovery.close()
        await pool.close()

    asyncio.run(run())
