"""Prefix index in Redis (or Valkey), shared by several routers.

Layout. Each worker owns a slot, a small integer (`baton:slots`: worker -> slot, the lowest
free one, given at resync and freed by removal). `baton:b:<hash>` (the block hash in 16 hex
digits) is a string with one byte per slot: byte p is the tier bitmask of slot p's copies
(bit t: a copy in tier t; 0: slot p does not hold the block), so a stored block is one
SETBIT. `baton:wblk:<worker>` is the set of a worker's hashes (for `cleared`, resync and
removal); `baton:wmeta:<worker>` its instance id and last applied event id; `baton:workers`
a sorted set of worker -> lease expiry.

Invariants: byte p of `baton:b:<h>` is non-zero iff h is in the set of slot p's worker; no
`baton:b:` string is all zeros (the last holder's removal deletes it).

Several routers follow the same workers and apply the same batches: a Lua script applies
a batch atomically and only if its id is the next one, so duplicates are no-ops and the
index never double-counts. A lookup is one script call that walks the request's blocks on
the server and answers a few lines (see `_LOOKUP`). Entries of a worker whose lease expired
are ignored at once and deleted by whichever router notices. Worker ids must not contain a
tab or a newline (they are addresses).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from kvtransfer.events import CLEARED, STORED, KVEventBatch, Tier
from router.prefix_index import Overlap

# Shared by the scripts that write. `alone(v, i)`: no byte of v but the i-th is set, so
# clearing that one leaves nothing (and the key is deleted instead).
_LIB = r"""
local SLOTS, PREFIX = 'baton:slots', 'baton:b:'

local function alone(v, i)
  local at = string.find(v, '[^%z]')
  if at == i then at = string.find(v, '[^%z]', i + 1) end
  return at == nil
end

local function chunked(cmd, key, list)  -- unpack() has a stack limit
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end

local function clear_worker(wblk, p)
  for _, h in ipairs(redis.call('SMEMBERS', wblk)) do
    local key = PREFIX .. h
    local v = redis.call('GET', key)
    if v then
      if alone(v, p + 1) then
        redis.call('DEL', key)
      elseif (string.byte(v, p + 1) or 0) > 0 then
        redis.call('SETRANGE', key, p, '\0')
      end
    end
  end
  redis.call('DEL', wblk)
end
"""

# ARGV: instance, event id, worker, then per event an op ('s<tier>', 'r<tier>' or 'c') and
# its hashes (16 hex digits each). The worker's set is written once per batch (`held`: a
# hash's membership after the batch), so a stored block costs one SETBIT and a removed one
# GET + SETBIT (or DEL).
_APPLY = _LIB + r"""
local meta, wblk, worker = KEYS[1], KEYS[2], ARGV[3]
local m = redis.call('HMGET', meta, 'instance', 'last')
if m[1] ~= ARGV[1] then return -1 end
local last = tonumber(m[2] or '-1')
local eid = tonumber(ARGV[2])
if eid <= last then return 1 end
if eid ~= last + 1 then return -2 end
local p = tonumber(redis.call('HGET', SLOTS, worker) or '')
if not p then return -1 end
local held = {}
local function sync()
  local add, gone = {}, {}
  for h, yes in pairs(held) do
    if yes then add[#add + 1] = h else gone[#gone + 1] = h end
  end
  chunked('SADD', wblk, add)
  chunked('SREM', wblk, gone)
  held = {}
end
for i = 4, #ARGV, 2 do
  local op, blob = ARGV[i], ARGV[i + 1]
  if op == 'c' then
    sync()
    clear_worker(wblk, p)
  else
    local tier = tonumber(string.sub(op, 2))
    local tbit, off = 2 ^ tier, 8 * p + 7 - tier  -- SETBIT counts bits from the MSB
    if string.sub(op, 1, 1) == 's' then
      for j = 1, #blob, 16 do
        local h = string.sub(blob, j, j + 15)
        redis.call('SETBIT', PREFIX .. h, off, 1)
        held[h] = true
      end
    else
      for j = 1, #blob, 16 do
        local h = string.sub(blob, j, j + 15)
        local key = PREFIX .. h
        local v = redis.call('GET', key)
        local mask = v and string.byte(v, p + 1) or 0
        if mask % (2 * tbit) >= tbit then
          if mask ~= tbit then
            redis.call('SETBIT', key, off, 0)
          else  -- its last copy
            held[h] = false
            if alone(v, p + 1) then
              redis.call('DEL', key)
            else
              redis.call('SETBIT', key, off, 0)
            end
          end
        end
      end
    end
  end
end
sync()
redis.call('HSET', meta, 'last', eid)
return 0
"""

_DROP = _LIB + r"""
local wblk, worker = KEYS[1], ARGV[1]
local p = redis.call('HGET', SLOTS, worker)
if p then clear_worker(wblk, tonumber(p)) end
redis.call('HDEL', SLOTS, worker)
redis.call('DEL', wblk, KEYS[2])
redis.call('ZREM', 'baton:workers', worker)
return 0
"""

# Replace a worker's entries with a snapshot in one step: other routers' lookups never see
# the worker half-dropped (a non-atomic drop-then-add showed up as misrouted requests).
# ARGV: worker, instance, last event id, lease expiry, then (tier bitmask, hashes) pairs.
_RESYNC = _LIB + r"""
local wblk, meta, worker = KEYS[1], KEYS[2], ARGV[1]
local p = tonumber(redis.call('HGET', SLOTS, worker) or '')
if p then
  clear_worker(wblk, p)
else
  local used = {}
  for _, x in ipairs(redis.call('HVALS', SLOTS)) do used[tonumber(x)] = true end
  p = 0
  while used[p] do p = p + 1 end
  redis.call('HSET', SLOTS, worker, p)
end
local add = {}
for i = 5, #ARGV, 2 do
  local c, blob = string.char(tonumber(ARGV[i])), ARGV[i + 1]
  for j = 1, #blob, 16 do
    local h = string.sub(blob, j, j + 15)
    redis.call('SETRANGE', PREFIX .. h, p, c)
    add[#add + 1] = h
  end
end
chunked('SADD', wblk, add)
redis.call('HSET', meta, 'instance', ARGV[2], 'last', ARGV[3])
redis.call('ZADD', 'baton:workers', ARGV[4], worker)
return 0
"""

# ARGV: now, the request's hashes (16 hex digits each). Walks the blocks while a live
# worker still holds an unbroken run (`alive`, ordered by slot); a worker's run is where it
# left. `pat` matches a block whose every alive slot has a device copy (odd tier mask), one
# string.find for all of them; a block equal to the last one that matched (often: the
# blocks of a shared prefix have the same holders) costs nothing more. Otherwise a loop
# over the alive slots drops the ones that miss the block and counts slow-tier copies.
# Answer: one line per distinct overlap, "device host disk" then the workers, tab-separated;
# live workers that hold no leading block are in the "0 0 0" line.
_LOOKUP = r"""
local PREFIX = 'baton:b:'
local live = redis.call('ZRANGEBYSCORE', 'baton:workers', ARGV[1], '+inf')
if #live == 0 then return '' end
local slots = redis.call('HMGET', 'baton:slots', unpack(live))
local alive, done = {}, {}  -- {slot, worker, host, disk}; done: {run, worker, host, disk}
for i, w in ipairs(live) do
  if slots[i] then alive[#alive + 1] = {tonumber(slots[i]), w, 0, 0}
  else done[#done + 1] = {0, w, 0, 0} end
end
table.sort(alive, function(a, b) return a[1] < b[1] end)

local function pattern()
  local parts, pos = {'^'}, 0
  for _, a in ipairs(alive) do
    parts[#parts + 1] = string.rep('.', a[1] - pos) .. '[\1\3\5\7]'
    pos = a[1] + 1
  end
  return table.concat(parts)
end

local blob = ARGV[2]
local n = #blob / 16
local pat, fast, i = pattern(), nil, 0  -- i: blocks walked
while i < n and #alive > 0 do
  local keys = {}
  for j = i + 1, math.min(n, i + 64) do
    keys[#keys + 1] = PREFIX .. string.sub(blob, 16 * j - 15, 16 * j)
  end
  for _, v in ipairs(redis.call('MGET', unpack(keys))) do
    if v ~= fast then
      if v and string.find(v, pat) then
        fast = v
      else
        local keep = {}
        for _, a in ipairs(alive) do
          local mask = v and string.byte(v, a[1] + 1) or 0
          if mask == 0 then
            done[#done + 1] = {i, a[2], a[3], a[4]}
          else
            keep[#keep + 1] = a
            if mask % 2 == 0 then  -- the fastest copy is in host or disk
              if mask % 4 == 2 then a[3] = a[3] + 1 else a[4] = a[4] + 1 end
            end
          end
        end
        if #keep < #alive then
          alive = keep
          pat = pattern()
        end
        fast = nil
        if #alive == 0 then break end
      end
    end
    i = i + 1
  end
end
for _, a in ipairs(alive) do done[#done + 1] = {n, a[2], a[3], a[4]} end

local groups, lines = {}, {}
for _, d in ipairs(done) do
  local head = (d[1] - d[3] - d[4]) .. ' ' .. d[3] .. ' ' .. d[4]
  local g = groups[head]
  if not g then
    g = {head}
    groups[head] = g
    lines[#lines + 1] = g
  end
  g[#g + 1] = d[2]
end
for k, g in ipairs(lines) do lines[k] = table.concat(g, '\t') end
return table.concat(lines, '\n')
"""


def _hex(hashes: Sequence[int]) -> str:
    """Block hashes as the scripts take them: 16 hex digits each, no separator."""
    return struct.pack(f">{len(hashes)}Q", *hashes).hex()


class RedisPrefixIndex:
    def __init__(self, url: str, lease_seconds: float = 10.0) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.r = aioredis.from_url(url, decode_responses=True, socket_timeout=2.0,
                                   socket_connect_timeout=2.0)
        self._apply = self.r.register_script(_APPLY)
        self._drop = self.r.register_script(_DROP)
        self._resync = self.r.register_script(_RESYNC)
        self._lookup = self.r.register_script(_LOOKUP)

    async def close(self) -> None:
        await self.r.aclose()

    async def renew_lease(self, worker_id: str) -> None:
        await self.r.zadd("baton:workers", {worker_id: time.time() + self.lease_seconds})

    async def apply(self, batch: KVEventBatch) -> bool:
        args: list = [batch.instance_id, batch.event_id, batch.worker_id]
        for ev in batch.events:
            if ev.kind == CLEARED:
                args += ["c", ""]
            else:
                args += [f"{'s' if ev.kind == STORED else 'r'}{int(ev.tier)}",
                         _hex(ev.block_hashes)]
        res = await self._apply(keys=[f"baton:wmeta:{batch.worker_id}",
                                      f"baton:wblk:{batch.worker_id}"], args=args)
        return res >= 0

    async def resync(self, worker_id: str, instance_id: str, last_event_id: int,
                     blocks: list[tuple[int, Tier]]) -> None:
        masks: dict[int, int] = {}
        for h, tier in blocks:
            masks[h] = masks.get(h, 0) | (1 << int(tier))
        by_mask: dict[int, list[int]] = {}
        for h, mask in masks.items():
            by_mask.setdefault(mask, []).append(h)
        args: list = [worker_id, instance_id, last_event_id, time.time() + self.lease_seconds]
        for mask, hashes in by_mask.items():
            args += [mask, _hex(hashes)]
        await self._resync(keys=[f"baton:wblk:{worker_id}", f"baton:wmeta:{worker_id}"],
                           args=args)

    async def remove_worker(self, worker_id: str) -> None:
        await self._drop(keys=[f"baton:wblk:{worker_id}", f"baton:wmeta:{worker_id}"],
                         args=[worker_id])

    async def lookup(self, block_hashes: Sequence[int]) -> dict[str, Overlap]:
        reply = await self._lookup(args=[time.time(), _hex(block_hashes)])
        out: dict[str, Overlap] = {}
        for line in reply.split("\n") if reply else ():
            head, *workers = line.split("\t")
            out.update(dict.fromkeys(workers, Overlap(*map(int, head.split()))))
        return out

    async def expired_workers(self) -> list[str]:
        return await self.r.zrangebyscore("baton:workers", "-inf", time.time())
