"""Prefix index in Redis (or Valkey), shared by several routers.

Layout: `baton:blk:<hash>` is a hash of worker -> tier bitmask; `baton:wblk:<worker>` the
set of a worker's hashes (for resync and removal); `baton:wmeta:<worker>` its instance id
and last applied event id; `baton:workers` a sorted set of worker -> lease expiry.

Several routers follow the same workers and apply the same batches: a Lua script applies
a batch atomically and only if its id is the next one, so duplicates are no-ops and the
index never double-counts. A lookup is one pipelined round trip. Entries of a worker
whose lease expired are ignored at once and deleted by whichever router notices.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from kvtransfer.events import CLEARED, STORED, KVEventBatch, Tier
from router.prefix_index import Overlap, best_tier

_APPLY = """
local meta, wblk, worker = KEYS[1], KEYS[2], ARGV[3]
if redis.call('HGET', meta, 'instance') ~= ARGV[1] then return -1 end
local last = tonumber(redis.call('HGET', meta, 'last') or '-1')
local eid = tonumber(ARGV[2])
if eid <= last then return 1 end
if eid ~= last + 1 then return -2 end
for i = 4, #ARGV, 3 do
  local kind, tier, h = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local key = 'baton:blk:' .. h
  local bitv = 2 ^ tier
  if kind == 's' then
    local m = tonumber(redis.call('HGET', key, worker) or '0')
    if math.floor(m / bitv) % 2 == 0 then m = m + bitv end
    redis.call('HSET', key, worker, m)
    redis.call('SADD', wblk, h)
  elseif kind == 'r' then
    local m = tonumber(redis.call('HGET', key, worker) or '0')
    if math.floor(m / bitv) % 2 == 1 then m = m - bitv end
    if m == 0 then
      redis.call('HDEL', key, worker)
      redis.call('SREM', wblk, h)
    else
      redis.call('HSET', key, worker, m)
    end
  elseif kind == 'c' then
    for _, x in ipairs(redis.call('SMEMBERS', wblk)) do
      redis.call('HDEL', 'baton:blk:' .. x, worker)
    end
    redis.call('DEL', wblk)
  end
end
redis.call('HSET', meta, 'last', eid)
return 0
"""

_DROP = """
local wblk, worker = KEYS[1], ARGV[1]
for _, x in ipairs(redis.call('SMEMBERS', wblk)) do
  redis.call('HDEL', 'baton:blk:' .. x, worker)
end
redis.call('DEL', wblk, KEYS[2])
redis.call('ZREM', 'baton:workers', worker)
return 0
"""


# Replace a worker's entries with a snapshot in one step: other routers' lookups never see
# the worker half-dropped (a non-atomic drop-then-add showed up as misrouted requests).
_RESYNC = """
local wblk, meta, worker = KEYS[1], KEYS[2], ARGV[1]
for _, x in ipairs(redis.call('SMEMBERS', wblk)) do
  redis.call('HDEL', 'baton:blk:' .. x, worker)
end
redis.call('DEL', wblk)
for i = 5, #ARGV, 2 do
  redis.call('HSET', 'baton:blk:' .. ARGV[i], worker, ARGV[i + 1])
  redis.call('SADD', wblk, ARGV[i])
end
redis.call('HSET', meta, 'instance', ARGV[2], 'last', ARGV[3])
redis.call('ZADD', 'baton:workers', ARGV[4], worker)
return 0
"""


class RedisPrefixIndex:
    def __init__(self, url: str, lease_seconds: float = 10.0) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.r = aioredis.from_url(url, decode_responses=True, socket_timeout=2.0,
                                   socket_connect_timeout=2.0)
        self._apply = self.r.register_script(_APPLY)
        self._drop = self.r.register_script(_DROP)
        self._resync = self.r.register_script(_RESYNC)

    async def close(self) -> None:
        await self.r.aclose()

    async def renew_lease(self, worker_id: str) -> None:
        await self.r.zadd("baton:workers", {worker_id: time.time() + self.lease_seconds})

    async def apply(self, batch: KVEventBatch) -> bool:
        args: list = [batch.instance_id, batch.event_id, batch.worker_id]
        for ev in batch.events:
            code = "s" if ev.kind == STORED else "c" if ev.kind == CLEARED else "r"
            hashes = ev.block_hashes or [0]
            for h in hashes:
                args += [code, int(ev.tier), str(h)]
        res = await self._apply(keys=[f"baton:wmeta:{batch.worker_id}",
                                      f"baton:wblk:{batch.worker_id}"], args=args)
        return res >= 0

    async def resync(self, worker_id: str, instance_id: str, last_event_id: int,
                     blocks: list[tuple[int, Tier]]) -> None:
        masks: dict[int, int] = {}
        for h, tier in blocks:
            masks[h] = masks.get(h, 0) | (1 << int(tier))
        args: list = [worker_id, instance_id, last_event_id, time.time() + self.lease_seconds]
        for h, mask in masks.items():
            args += [str(h), mask]
        await self._resync(keys=[f"baton:wblk:{worker_id}", f"baton:wmeta:{worker_id}"],
                           args=args)

    async def remove_worker(self, worker_id: str) -> None:
        await self._drop(keys=[f"baton:wblk:{worker_id}", f"baton:wmeta:{worker_id}"],
                         args=[worker_id])

    async def lookup(self, block_hashes: list[int]) -> dict[str, Overlap]:
        pipe = self.r.pipeline(transaction=False)
        pipe.zrangebyscore("baton:workers", time.time(), "+inf")
        for h in block_hashes:
            pipe.hgetall(f"baton:blk:{h}")
        live, *rows = await pipe.execute()
        counts = {w: [0, 0, 0] for w in live}  # per tier
        alive = set(live)
        for row in rows:
            alive &= row.keys()
            if not alive:
                break
            for w in alive:
                counts[w][best_tier(int(row[w]))] += 1
        return {w: Overlap(*c) for w, c in counts.items()}

    async def expired_workers(self) -> list[str]:
        return await self.r.zrangebyscore("baton:workers", "-inf", time.time())
