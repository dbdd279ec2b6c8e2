"""Prefix index in Redis (or Valkey), shared by several routers.

Layout. Each worker the index knows owns a slot, a small integer: `baton:slots` maps
worker -> slot (the lowest free one, given at its first resync or lease renewal, freed by
removal). A block's key is `baton:b:` + its hash as 8 big-endian bytes (binary, 16 bytes
in all); its value has one byte per slot, byte p being the tier bitmask of slot p's copies
(bit t: a copy in tier t; 0: slot p does not hold the block), so storing a block is one
SETBIT. `baton:wblk:<worker>` is the set of the block keys a worker holds (for `cleared`,
resync and removal); `baton:wmeta:<worker>` its instance id and last applied event id;
`baton:leases` a sorted set of "<slot> <worker>" -> lease expiry; `baton:roster` the same
"<slot> <worker>" lines in one string, rewritten when a slot is given or freed, so that a
lookup reads the roster as one value and asks the sorted set only for the expired entries.

Invariants: byte p of a block's value is non-zero iff its key is in the set of slot p's
worker; no value is all zeros (the last holder's removal deletes the key); a worker with a
slot has exactly one lease entry and one roster line, and only such a worker has them.

Several routers follow the same workers and apply the same batches: a Lua script applies
a batch atomically and only if its id is the next one, so duplicates are no-ops and the
index never double-counts. A lookup is one script call that walks the request's blocks on
the server and answers only the counts (`_LOOKUP`). Entries of a worker whose lease expired
are ignored at once and deleted by whichever router notices. Worker ids must not contain a
newline (they are addresses).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence

import redis.asyncio as aioredis

from kvtransfer.events import CLEARED, STORED, KVEventBatch, Tier
from router.prefix_index import NO_OVERLAP, Overlap

_PREFIX = b"baton:b:"

# Shared by the scripts that write. `alone(v, p)`: no byte of v but slot p's is set, so
# clearing that one leaves nothing (and the key is deleted instead). The usual such value,
# one slot's as SETBIT wrote it, is checked by one string comparison (a Lua pattern scan
# costs ~30 ns a byte).
_LIB = r"""
local SLOTS, LEASES, ROSTER = 'baton:slots', 'baton:leases', 'baton:roster'

local lone = {}  -- p * 8 + mask -> p zero bytes, then mask
local function alone(v, p)
  if #v == p + 1 then
    local m = string.byte(v, p + 1)
    local e = lone[p * 8 + m]
    if not e then
      e = string.rep('\0', p) .. string.char(m)
      lone[p * 8 + m] = e
    end
    return v == e
  end
  local at = string.find(v, '[^%z]')
  if at == p + 1 then at = string.find(v, '[^%z]', p + 2) end
  return at == nil
end

local function chunked(cmd, key, list)  -- unpack() has a stack limit
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end

local function write_roster()  -- "<slot> <worker>" lines, rewritten when slots change
  local all, lines = redis.call('HGETALL', SLOTS), {}
  for i = 1, #all, 2 do lines[#lines + 1] = all[i + 1] .. ' ' .. all[i] end
  if #lines > 0 then
    redis.call('SET', ROSTER, table.concat(lines, '\n'))
  else
    redis.call('DEL', ROSTER)
  end
end

local function slot_of(worker)  -- its slot, given now if it has none
  local p = redis.call('HGET', SLOTS, worker)
  if p then return tonumber(p) end
  local used = {}
  for _, x in ipairs(redis.call('HVALS', SLOTS)) do used[tonumber(x)] = true end
  p = 0
  while used[p] do p = p + 1 end
  redis.call('HSET', SLOTS, worker, p)
  write_roster()
  return p
end

local function clear_worker(wblk, p)
  for _, key in ipairs(redis.call('SMEMBERS', wblk)) do
    local v = redis.call('GET', key)
    if v then
      if alone(v, p) then
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
# its block keys, concatenated. A stored block is one SETBIT; a removed one is read by one
# MGET per event, then emptied keys go in one DEL and the others get a SETBIT. The worker's
# set takes one SADD or SREM per event.
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
for i = 4, #ARGV, 2 do
  local op, blob = ARGV[i], ARGV[i + 1]
  if op == 'c' then
    clear_worker(wblk, p)
  else
    local tier = tonumber(string.sub(op, 2))
    local tbit, off = 2 ^ tier, 8 * p + 7 - tier  -- SETBIT counts bits from the MSB
    for c = 1, #blob, 16 * 512 do  -- unpack() has a stack limit
      local keys = {}
      for j = c, math.min(#blob, c + 16 * 512 - 1), 16 do
        keys[#keys + 1] = string.sub(blob, j, j + 15)
      end
      if string.sub(op, 1, 1) == 's' then
        for _, key in ipairs(keys) do redis.call('SETBIT', key, off, 1) end
        redis.call('SADD', wblk, unpack(keys))
      else
        local vals, dels, gone = redis.call('MGET', unpack(keys)), {}, {}
        for k, key in ipairs(keys) do
          local v = vals[k]
          local mask = v and string.byte(v, p + 1) or 0
          if mask == tbit then  -- its last copy
            gone[#gone + 1] = key
            if alone(v, p) then
              dels[#dels + 1] = key
            else
              redis.call('SETBIT', key, off, 0)
            end
          elseif mask % (2 * tbit) >= tbit then
            redis.call('SETBIT', key, off, 0)
          end
        end
        if #dels > 0 then redis.call('DEL', unpack(dels)) end
        if #gone > 0 then redis.call('SREM', wblk, unpack(gone)) end
      end
    end
  end
end
redis.call('HSET', meta, 'last', eid)
return 0
"""

_DROP = _LIB + r"""
local wblk, worker = KEYS[1], ARGV[1]
local p = redis.call('HGET', SLOTS, worker)
if p then
  clear_worker(wblk, tonumber(p))
  redis.call('ZREM', LEASES, p .. ' ' .. worker)
  redis.call('HDEL', SLOTS, worker)
  write_roster()
end
redis.call('DEL', wblk, KEYS[2])
return 0
"""

_RENEW = _LIB + r"""
redis.call('ZADD', LEASES, ARGV[2], slot_of(ARGV[1]) .. ' ' .. ARGV[1])
return 0
"""

# Replace a worker's entries with a snapshot in one step: other routers' lookups never see
# the worker half-dropped (a non-atomic drop-then-add showed up as misrouted requests).
# ARGV: worker, instance, last event id, lease expiry, then (tier bitmask, keys) pairs.
_RESYNC = _LIB + r"""
local wblk, meta, worker = KEYS[1], KEYS[2], ARGV[1]
local p = slot_of(worker)
clear_worker(wblk, p)
local add = {}
for i = 5, #ARGV, 2 do
  local c, blob = string.char(tonumber(ARGV[i])), ARGV[i + 1]
  for j = 1, #blob, 16 do
    local key = string.sub(blob, j, j + 15)
    redis.call('SETRANGE', key, p, c)
    add[#add + 1] = key
  end
end
chunked('SADD', wblk, add)
redis.call('HSET', meta, 'instance', ARGV[2], 'last', ARGV[3])
redis.call('ZADD', LEASES, ARGV[4], p .. ' ' .. worker)
return 0
"""

# ARGV: now, the request's block keys (concatenated). Walks the blocks while some slot
# still holds an unbroken run: `alive` (byte positions, slot + 1) starts as the holders of
# the first block and only shrinks, so a slot's run is where it left. A block whose value
# equals the previous one (same bytes: the same Lua string) changes nothing and costs one
# comparison, unless it had slow-tier copies to count. Keys are fetched by MGET in chunks
# (a short first one: many requests miss at once). A Lua op that makes a string costs
# ~0.5 us on the 2-core benchmark machine, and every element of a command's reply about as
# much, so the walk ignores leases and names, and formats no number per slot. Reply: the
# roster, the expired leases (usually none), the distinct answers ("device host disk"
# lines) and a string with one byte per slot, the slot's line (1-based; 0: no leading
# block), two bytes (big-endian) from 256 lines on.
_LOOKUP = r"""
local blob = ARGV[2]
local n = #blob / 16
local alive, host, disk, heads, at = nil, {}, {}, {}, {}
local prev, slow, i, size, stop = nil, false, 0, 16, false

local function finish(run, gone)  -- the slots in gone held exactly `run` leading blocks
  if run == 0 then return end
  local plain = 0
  for _, p in ipairs(gone) do
    local h, d = host[p] or 0, disk[p] or 0
    if h + d > 0 then
      heads[#heads + 1] = (run - h - d) .. ' ' .. h .. ' ' .. d
      at[p] = #heads
    else
      if plain == 0 then
        heads[#heads + 1] = run .. ' 0 0'
        plain = #heads
      end
      at[p] = plain
    end
  end
end

while i < n and not stop do
  local keys = {}
  for j = i + 1, math.min(n, i + size) do
    keys[#keys + 1] = string.sub(blob, 16 * j - 15, 16 * j)
  end
  size = 64
  for _, v in ipairs(redis.call('MGET', unpack(keys))) do
    if v ~= prev or slow then
      local b = v and {string.byte(v, 1, -1)} or {}
      if not alive then
        alive = {}
        for p = 1, #b do
          if b[p] > 0 then alive[#alive + 1] = p end
          at[p] = 0
        end
      end
      local keep, gone = {}, {}
      slow = false
      for _, p in ipairs(alive) do
        local mask = b[p] or 0
        if mask == 0 then
          gone[#gone + 1] = p
        else
          keep[#keep + 1] = p
          if mask % 2 == 0 then  -- the fastest copy is in host or disk
            slow = true
            if mask % 4 == 2 then
              host[p] = (host[p] or 0) + 1
            else
              disk[p] = (disk[p] or 0) + 1
            end
          end
        end
      end
      if #gone > 0 then
        finish(i, gone)
        alive = keep
      end
      if #alive == 0 then
        stop = true
        break
      end
      prev = v
    end
    i = i + 1
  end
end
if alive and not stop then finish(n, alive) end
if #heads > 255 then  -- two bytes a slot
  local wide = {}
  for p = 1, #at do
    wide[2 * p - 1] = math.floor(at[p] / 256)
    wide[2 * p] = at[p] % 256
  end
  at = wide
end
local expired = redis.call('ZRANGEBYSCORE', 'baton:leases', '-inf', '(' .. ARGV[1])
return {redis.call('GET', 'baton:roster') or '', table.concat(expired, '\n'),
        table.concat(heads, '\n'), string.char(unpack(at))}
"""


def _keys(hashes: Sequence[int]) -> bytes:
    """The block keys of `hashes`, concatenated: _PREFIX + 8 big-endian bytes each."""
    raw = struct.pack(f">{len(hashes)}Q", *hashes)
    out = bytearray(_PREFIX * (2 * len(hashes)))
    for k in range(8):  # byte k of every hash, in one strided copy
        out[8 + k :: 16] = raw[k::8]
    return bytes(out)


class RedisPrefixIndex:
    def __init__(self, url: str, lease_seconds: float = 10.0) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        self.r = aioredis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._apply = self.r.register_script(_APPLY)
        self._drop = self.r.register_script(_DROP)
        self._renew = self.r.register_script(_RENEW)
        self._resync = self.r.register_script(_RESYNC)
        self._lookup = self.r.register_script(_LOOKUP)
        self._roster: tuple[bytes, list[tuple[bytes, int, str]]] = (b"", [])  # parsed

    async def close(self) -> None:
        await self.r.aclose()

    async def renew_lease(self, worker_id: str) -> None:
        await self._renew(args=[worker_id, time.time() + self.lease_seconds])

    async def apply(self, batch: KVEventBatch) -> bool:
        args: list = [batch.instance_id, batch.event_id, batch.worker_id]
        for ev in batch.events:
            if ev.kind == CLEARED:
                args += ["c", ""]
            else:
                args += [f"{'s' if ev.kind == STORED else 'r'}{int(ev.tier)}",
                         _keys(ev.block_hashes)]
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
            args += [mask, _keys(hashes)]
        await self._resync(keys=[f"baton:wblk:{worker_id}", f"baton:wmeta:{worker_id}"],
                           args=args)

    async def remove_worker(self, worker_id: str) -> None:
        await self._drop(keys=[f"baton:wblk:{worker_id}", f"baton:wmeta:{worker_id}"],
                         args=[worker_id])

    async def lookup(self, block_hashes: Sequence[int]) -> dict[str, Overlap]:
        roster, expired, heads, at = await self._lookup(args=[time.time(),
                                                              _keys(block_hashes)])
        if roster != self._roster[0]:
            self._roster = (roster, _parse_roster(roster))
        answers = [NO_OVERLAP]
        for line in heads.split(b"\n") if heads else ():
            answers.append(Overlap(*map(int, line.split())))
        if len(answers) > 256:
            at = [at[k] << 8 | at[k + 1] for k in range(0, len(at), 2)]
        gone = set(expired.split(b"\n")) if expired else ()
        return {worker: answers[at[slot]] if slot < len(at) else NO_OVERLAP
                for line, slot, worker in self._roster[1] if line not in gone}

    async def expired_workers(self) -> list[str]:
        leases = await self.r.zrangebyscore("baton:leases", "-inf", time.time())
        return [lease.decode().split(" ", 1)[1] for lease in leases]


def _parse_roster(roster: bytes) -> list[tuple[bytes, int, str]]:
    """(line, slot, worker) per "<slot> <worker>" line of `baton:roster`."""
    out = []
    for line in roster.split(b"\n") if roster else ():
        slot, worker = line.split(b" ", 1)
        out.append((line, int(slot), worker.decode()))
    return out
