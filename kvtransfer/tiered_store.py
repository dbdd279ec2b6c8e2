"""G2 (host DRAM) and G3 (disk) below the device KV cache (G1).

Offload on eviction: when the block pool is about to reuse a cached G1 block, its
contents are copied down to G2 first (on a GPU: on the compute stream into pinned
memory, non-blocking, so it is ordered before the kernels that overwrite the block and
costs the step no host sync). A block pushed out of G2 goes to G3 (written by a
background thread). A prefix hit in G2 or G3 is copied back into a fresh G1 block
before the step that needs it, and from then on is an ordinary G1 hit.

A disk hit is only worth taking when reading the block is faster than recomputing it: a
fast GPU next to a slow disk recomputes a 16-token block of an 8B model in ~0.5 ms but
reads its 2 MiB in more. The store measures what a disk load costs (a moving average) and
the KV manager compares it with the measured prefill cost per block; disk hits that would
be slower are skipped (counted), with an occasional one taken to keep the measure fresh.

Disk hits are best read ahead: when a request is queued (and each scheduling pass, for the
requests next in line) the KV manager asks for its disk blocks, which a reader thread
brings into a bounded host staging area (kvtransfer.disk_prefetch). Admission then copies
from there; a read still in flight is waited for only while that is cheaper than
recomputing what it unlocks, else the rest of the prefix is recomputed.

Every move is a KV event with its tier, so the router's prefix index credits a worker
for what it holds in each tier. Contents are keyed by the block's chained hash and
checked against its token ids, like G1 hits.

Under tensor parallelism (`ShardedTiers`) every rank holds its KV heads of each block in
G1 and G2 (host copies are repeated on every rank), but a disk file holds the whole block,
every rank's heads, written and read by the leader alone: blocks leaving G2 are gathered
from the ranks' host slots (batched, once per step), and a disk hit is scattered to the
ranks' G1 blocks. So the ranks never disagree about a file (a bad one is dropped once, by
the leader), a restart needs no agreement, and files are the same at any TP size.
"""

from __future__ import annotations

import logging
import queue
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvtransfer.disk_prefetch import DiskPrefetcher
from kvtransfer.disk_tier import DiskTier
from kvtransfer.events import EventRecorder, Tier

log = logging.getLogger(__name__)


@dataclass
class ShardedTiers:
    """How the tiers reach the other ranks' shards under TP (engine/tensor_parallel.py).
    Each call is collective: the leader runs it between steps, the followers in their
    loop."""

    full_block_shape: tuple[int, ...]  # a block with every rank's KV heads
    read_blocks: Callable[[list[int]], torch.Tensor]  # G1 blocks, full, on the CPU
    write_blocks: Callable[[list[int], torch.Tensor], None]  # full blocks into G1 blocks
    read_host: Callable[[list[int]], torch.Tensor]  # host slots, full, on the CPU


@dataclass
class TierStats:
    offloaded_to_host: int = 0
    offloaded_to_disk: int = 0
    hits: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    dropped_bad_disk_blocks: int = 0
    disk_hits_skipped: int = 0  # slower than recomputing, by the measured costs
    # Write-behind is best effort: when the disk falls behind, blocks leave G2 without a
    # copy on disk, and an offload finding every slot still being written is skipped.
    disk_writes_dropped: int = 0
    offloads_skipped_busy: int = 0
    disk_writes_skipped_unused: int = 0  # policy "reused": seen once, not worth a write
    # Disk read-ahead: reads issued into staging; disk hits served from there that were
    # ready when needed, or that the engine waited for; reads not done in time (the rest
    # was recomputed); reads given up unused (their request took the block elsewhere).
    prefetched: int = 0
    prefetch_hits: int = 0
    prefetch_waits: int = 0
    prefetch_late: int = 0
    prefetch_unused: int = 0


class TieredStore:
    def __init__(self, kv_cache: torch.Tensor, host_blocks: int, events: EventRecorder,
                 disk_dir: str | Path | None = None, disk_blocks: int = 0,
                 identity: bytes = b"\0" * 16, lossless_disk: bool = False,
                 disk_policy: str = "all", prefetch_blocks: int = 0,
                 sharded: ShardedTiers | None = None) -> None:
        self.kv_cache = kv_cache  # [num_blocks(+scratch), ...]: one block is one region
        self.events = events
        self.block_shape = tuple(kv_cache.shape[1:])
        self.sharded = sharded
        # What a disk file and a read-ahead slot hold: the whole block, under TP too.
        self.disk_block_shape = sharded.full_block_shape if sharded else self.block_shape
        # Under TP: host slots leaving for disk, gathered from the ranks at the next
        # `before_step` (slot, hash, tokens); their slots stay reserved until then.
        self._to_gather: list[tuple[int, int, tuple[int, ...]]] = []
        pin = kv_cache.is_cuda
        self.host = torch.empty((max(host_blocks, 0), *self.block_shape), dtype=kv_cache.dtype,
                                pin_memory=pin)
        self._host_index: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()
        self._free_slots = list(range(host_blocks - 1, -1, -1))
        self._slot_ready: dict[int, torch.cuda.Event] = {}
        # Slots demoted to disk stay reserved until the writer thread has read them; it
        # hands them back here, so the engine thread never waits on a device copy or disk.
        self._returned: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.disk = (DiskTier(disk_dir, identity, disk_blocks,
                              lambda kind, h: events.record(kind, h, Tier.DISK))
                     if disk_dir is not None and disk_blocks > 0 else None)
        # Disk reads ahead of admission, into this many staging blocks (0: off).
        self.prefetcher = (DiskPrefetcher(self.disk, self.disk_block_shape, kv_cache.dtype,
                                          prefetch_blocks, pin)
                           if self.disk is not None and prefetch_blocks > 0 else None)
        self._stats = TierStats()
        # Under tensor parallelism this holds rank 0's KV shard; every host<->device copy
        # is also reported here ("d2h"|"h2d", host slot, block id) for the other ranks to
        # repeat on theirs before the next forward (engine/tensor_parallel.py).
        self.mirror: Callable[[str, int, int], None] | None = None
        self.disk_s_per_block: float | None = None  # measured, moving average
        # Most blocks that may wait for the disk writer (reserved host slots); past it,
        # demoted blocks are dropped rather than queued.
        self.max_disk_backlog = max(1, min(256, host_blocks // 2))
        self.lossless_disk = lossless_disk  # wait for the writer instead of dropping
        # "all": every block leaving G2 goes to disk; "reused": only blocks seen more than
        # once (hit in G2, or offloaded again after being dropped), so one-off prompts do
        # not wear the disk or push reused blocks out of it.
        if disk_policy not in ("all", "reused"):
            raise ValueError(f"disk KV policy must be 'all' or 'reused', got {disk_policy!r}")
        self.disk_policy = disk_policy
        self._reused: set[int] = set()  # in G2 and hit there at least once
        # Recent offloads (hashes only), so a block dropped and recomputed is known as seen
        # twice. It must outlive a whole pass over the disk's worth of blocks, or a
        # conversation that returns after the host tier turned over is never written.
        self._offloaded: OrderedDict[int, None] = OrderedDict()
        self._ghost_limit = max(4 * host_blocks, disk_blocks if self.disk else 0, 1024)
        self._disk_decisions = 0
        log.info("tiered KV: host %d blocks (%.2f GiB%s), disk %s, read-ahead %d blocks",
                 host_blocks, self.host.numel() * self.host.element_size() / 2**30,
                 ", pinned" if pin else "",
                 f"{disk_blocks} blocks in {self.disk.dir}" if self.disk else "off",
                 len(self.prefetcher.staging) if self.prefetcher else 0)

    @property
    def stats(self) -> TierStats:
        """Counters, with those kept by the disk tier and the read-ahead brought up to date."""
        if self.disk is not None:
            self._stats.dropped_bad_disk_blocks = self.disk.dropped_bad
        if self.prefetcher is not None:
            self._stats.prefetched = self.prefetcher.submitted
            self._stats.prefetch_unused = self.prefetcher.unused
        return self._stats

    # -- offload ------------------------------------------------------------------------
    def offload(self, block_id: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Called by the block pool just before it reuses a cached block."""
        if block_hash in self._host_index or (self.disk and block_hash in self.disk):
            return
        if len(self.host) == 0:
            if self.disk is not None:
                block = (self.sharded.read_blocks([block_id])[0] if self.sharded
                         else self.kv_cache[block_id])
                self.disk.put(block_hash, tokens, self._payload(block))
                self._stats.offloaded_to_disk += 1
            return
        slot = self._take_slot()
        if slot is None:
            self._stats.offloads_skipped_busy += 1
            return
        self.host[slot].copy_(self.kv_cache[block_id], non_blocking=True)
        if self.mirror is not None:
            self.mirror("d2h", slot, block_id)
        if self.kv_cache.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
            self._slot_ready[slot] = ev
        self._host_index[block_hash] = (slot, tokens)
        self.events.record("stored", block_hash, Tier.HOST)
        self._stats.offloaded_to_host += 1
        if self.disk_policy == "reused":
            if block_hash in self._offloaded:  # back after being dropped: seen twice
                self._reused.add(block_hash)
            self._offloaded[block_hash] = None
            self._offloaded.move_to_end(block_hash)
            while len(self._offloaded) > self._ghost_limit:
                self._offloaded.popitem(last=False)

    def _take_slot(self) -> int | None:
        """A free host slot, or None when every one is still being written to disk: the
        engine thread never waits for the disk (the block is simply not kept)."""
        self._reclaim()
        if not self._free_slots and self._host_index:
            self._demote_oldest()
            self._reclaim()
        if not self._free_slots and self._to_gather:
            self.before_step()  # under TP: the slots waiting to be gathered come back
        if not self._free_slots and self.lossless_disk and self.disk is not None:
            self._free_slots.append(self._returned.get())
        return self._free_slots.pop() if self._free_slots else None

    def _reclaim(self) -> None:
        while True:
            try:
                self._free_slots.append(self._returned.get_nowait())
            except queue.Empty:
                return

    def _demote_oldest(self) -> None:
        block_hash, (slot, tokens) = self._host_index.popitem(last=False)
        self.events.record("removed", block_hash, Tier.HOST)
        reused = block_hash in self._reused
        self._reused.discard(block_hash)
        if self.disk is None or block_hash in self.disk:
            self._free_slots.append(slot)
            return
        if self.disk_policy == "reused" and not reused:
            self._stats.disk_writes_skipped_unused += 1
            self._free_slots.append(slot)
            return
        if not self.lossless_disk and self.disk.backlog >= self.max_disk_backlog:
            self._stats.disk_writes_dropped += 1
            self._free_slots.append(slot)
            return
        self._stats.offloaded_to_disk += 1
        if self.sharded is not None:
            self._to_gather.append((slot, block_hash, tokens))
            return
        ev = self._slot_ready.pop(slot, None)
        self.disk.put(block_hash, tokens, self.host[slot].view(-1).view(torch.uint8).numpy(),
                      ready=ev.synchronize if ev is not None else None,
                      done=lambda: self._returned.put(slot))

    def before_step(self) -> None:
        """Under TP: gather the host slots bound for disk from every rank (one collective
        for all of them) and queue their files; their slots are free again. The engine
        calls it between scheduling and the step."""
        if not self._to_gather:
            return
        pending, self._to_gather = self._to_gather, []
        slots = [slot for slot, _, _ in pending]
        for slot in slots:  # this rank's copies into them have landed
            ev = self._slot_ready.pop(slot, None)
            if ev is not None:
                ev.synchronize()
        full = self.sharded.read_host(slots)
        for (slot, block_hash, tokens), block in zip(pending, full):
            self.disk.put(block_hash, tokens, self._payload(block))
            self._free_slots.append(slot)

    def settle(self) -> None:
        """Wait for queued disk writes and reads ahead, take their slots back (tests,
        shutdown)."""
        self.before_step()
        if self.disk is not None:
            self.disk.flush()
        if self.prefetcher is not None:
            self.prefetcher.drain()
        self._reclaim()

    @staticmethod
    def _payload(block: torch.Tensor) -> bytes:
        host = block if block.device.type == "cpu" else block.cpu()
        return host.contiguous().view(torch.uint8).numpy().tobytes()

    # -- lookup and onboarding ------------------------------------------------------------
    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> Tier | None:
        hit = self._host_index.get(block_hash)
        if hit is not None:
            return Tier.HOST if hit[1] == tokens else None
        # Read ahead (or being read): usable even if the file was evicted meanwhile. A
        # failed read is settled here first (a bad block leaves the disk tier).
        if self.prefetcher is not None and self.prefetcher.get(block_hash, tokens) is not None:
            return Tier.DISK
        if self.disk is not None and self.disk.tokens(block_hash) == tokens:
            return Tier.DISK
        return None

    # -- read-ahead -----------------------------------------------------------------------
    @property
    def prefetching(self) -> bool:
        return self.prefetcher is not None

    def begin_prefetch_pass(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.begin_pass()

    def prefetch(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        """Start reading a disk hit (see `lookup`) ahead of its load; False when staging
        is full, so the caller stops asking."""
        p = self.prefetcher
        if p is None or block_hash in self._host_index or (
                block_hash not in p.entries and self.disk.is_pending(block_hash)):
            return True  # nothing to read: served from memory
        return p.submit(block_hash, tokens)

    def disk_ready(self, chain: list[int], tokens: tuple[int, ...],
                   recompute_s_per_block: float | None) -> bool:
        """May disk hit `chain[0]` (the rest: the prefix blocks after it) be loaded now?
        Read ahead: yes once its read is in, waiting for it only while that is cheaper
        than recomputing; a failed read is dropped (recompute). Not read ahead: the
        measured-cost guard for a read on this thread (`disk_worth_it`)."""
        f = self.prefetcher.get(chain[0], tokens) if self.prefetcher is not None else None
        if f is None:
            return self.disk_worth_it(recompute_s_per_block)
        if f.done.is_set():
            ok = self.prefetcher.get(chain[0], tokens) is not None  # drops a failed read
            self._stats.prefetch_hits += ok
            return ok
        budget = self.prefetcher.wait_budget(chain, self.disk_s_per_block,
                                             recompute_s_per_block)
        if budget is not None and f.done.wait(budget):
            if self.prefetcher.get(chain[0], tokens) is None:
                return False  # a bad block (dropped) or an evicted one
            self._stats.prefetch_waits += 1
            return True
        self._stats.prefetch_late += 1
        return False

    def load(self, block_hash: int, tokens: tuple[int, ...], block_id: int) -> bool:
        """Copy the block into G1 block `block_id`; False when it is gone or unusable."""
        hit = self._host_index.get(block_hash)
        if hit is not None and hit[1] == tokens:
            self._host_index.move_to_end(block_hash)
            self.kv_cache[block_id].copy_(self.host[hit[0]], non_blocking=True)
            if self.mirror is not None:
                self.mirror("h2d", hit[0], block_id)
            self._stats.hits["host"] += 1
            self._reused.add(block_hash)
            return True
        if self.disk is None:
            return False
        f = self.prefetcher.get(block_hash, tokens) if self.prefetcher is not None else None
        if f is not None and f.ready:
            if self.sharded is not None:  # every rank's heads, to their blocks
                self.prefetcher.take(f, lambda full: self.sharded.write_blocks([block_id],
                                                                                full[None]))
            else:
                self.prefetcher.take(f, self.kv_cache[block_id])
            self.disk.touch(block_hash)
            self._disk_loaded(f.seconds)
            return True
        t0 = time.perf_counter()
        payload = self.disk.get(block_hash)
        if payload is None:
            return False
        with warnings.catch_warnings():  # a not-yet-written payload is read-only bytes:
            warnings.simplefilter("ignore")  # fine, it is only read
            src = torch.frombuffer(payload, dtype=torch.uint8)
        if self.sharded is not None:
            full = src.view(self.kv_cache.dtype).view(1, *self.disk_block_shape)
            self.sharded.write_blocks([block_id], full)
        else:
            self.kv_cache[block_id].view(-1).view(torch.uint8).copy_(src)
        self._disk_loaded(time.perf_counter() - t0)
        return True

    def _disk_loaded(self, seconds: float) -> None:
        """A disk hit is in G1; `seconds`: what reading it cost (here, or on the reader)."""
        prev = self.disk_s_per_block
        self.disk_s_per_block = seconds if prev is None else 0.9 * prev + 0.1 * seconds
        self._stats.hits["disk"] += 1

    def disk_worth_it(self, recompute_s_per_block: float | None) -> bool:
        """Take a disk hit? Yes while either cost is unmeasured or disk is the cheaper;
        otherwise no, except one decision in 32 (costs change: page cache, load)."""
        if self.disk_s_per_block is None or recompute_s_per_block is None or \
                self.disk_s_per_block <= recompute_s_per_block:
            return True
        self._disk_decisions += 1
        if self._disk_decisions % 32 == 0:
            return True
        self._stats.disk_hits_skipped += 1
        return False

    def snapshot(self) -> list[tuple[int, Tier]]:
        out = [(h, Tier.HOST) for h in self._host_index]
        if self.disk is not None:
            out += [(h, Tier.DISK) for h in self.disk.hashes() if h not in self._host_index]
        return out

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.disk is not None:
            self.disk.close()
