"""Which worker holds which KV blocks, per tier, built from the workers' KV events.

`lookup(hashes)` answers, for each worker, how many *leading* blocks of a request it
holds and in which tiers: only an unbroken prefix saves prefill work. The in-memory
index serves one router; a Redis-backed one with the same interface lets several
routers share it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from kvtransfer.events import CLEARED, REMOVED, STORED, KVEventBatch, Tier
from router.block_map import BlockMap, slots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Overlap:
    """Leading blocks of a request held by one worker, split by tier. Immutable, so a
    lookup can hand the same value to many workers."""

    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host + self.disk


NO_OVERLAP = Overlap()


@dataclass
class _WorkerState:
    instance_id: str
    last_event_id: int
    slot: int
    bit: int  # 1 << slot
    blocks: dict[int, int]  # hash -> tier bitmask (bit t: a copy in tier t)


class InMemoryPrefixIndex:
    """Each worker owns one bit (its slot); per block hash the index keeps the bitmask of
    the workers holding a copy (`_holders`, a `BlockMap`), so a lookup costs one probe and
    one AND per block however many workers share the prefix, and an event updates the
    worker's dict and, for the blocks it gains or loses, the map.

    Invariants (`check()`): bit w is set in `_holders[h]` iff h is in worker w's `blocks`;
    `_slow[h]` = (workers whose fastest copy of h is in host, ... in disk) and exists only
    when one of them is non-zero, so a device-only cluster never consults it.
    """

    def __init__(self) -> None:
        self._workers: dict[str, _WorkerState] = {}
        self._names: list[str | None] = []  # slot -> worker
        self._live = 0  # bits of the workers we follow
        self._holders = BlockMap()
        self._slow: dict[int, tuple[int, int]] = {}
        self._runs = [NO_OVERLAP]  # _runs[n] == Overlap(device=n), shared by lookups

    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def num_blocks(self, worker_id: str) -> int:
        state = self._workers.get(worker_id)
        return len(state.blocks) if state else 0

    def apply(self, batch: KVEventBatch) -> bool:
        """Apply one batch; False (and nothing applied) when the consumer must resync:
        an unknown worker, a restarted one, or a gap in the event ids."""
        state = self._workers.get(batch.worker_id)
        if state is None or state.instance_id != batch.instance_id:
            return False
        if batch.event_id <= state.last_event_id:
            return True  # a duplicate delivery: already applied
        if batch.event_id != state.last_event_id + 1:
            log.warning("KV events of %s: gap (%d after %d), resync", batch.worker_id,
                        batch.event_id, state.last_event_id)
            return False
        for ev in batch.events:
            if ev.kind == STORED:
                self._store(state, ev.block_hashes, ev.tier)
            elif ev.kind == REMOVED:
                self._remove(state, ev.block_hashes, ev.tier)
            elif ev.kind == CLEARED:
                self._drop_blocks(state)
        state.last_event_id = batch.event_id
        return True

    def resync(self, worker_id: str, instance_id: str, last_event_id: int,
               blocks: list[tuple[int, Tier]]) -> None:
        """Replace what we know of a worker with its snapshot (taken at last_event_id)."""
        self.remove_worker(worker_id)
        slot = (~self._live & (self._live + 1)).bit_length() - 1  # the lowest free one
        if slot == len(self._names):
            self._names.append(None)
        state = _WorkerState(instance_id, last_event_id, slot, 1 << slot, {})
        self._workers[worker_id] = state
        self._names[slot] = worker_id
        self._live |= state.bit
        by_tier: dict[Tier, list[int]] = {}
        for h, tier in blocks:
            by_tier.setdefault(tier, []).append(h)
        for tier, hashes in by_tier.items():
            self._store(state, hashes, tier)

    def remove_worker(self, worker_id: str) -> None:
        state = self._workers.pop(worker_id, None)
        if state is not None:
            self._drop_blocks(state)
            self._live &= ~state.bit
            self._names[state.slot] = None

    def lookup(self, block_hashes: Sequence[int]) -> dict[str, Overlap]:
        if not self._live:
            return {}
        # Per slot, the worker's leading blocks (in any tier) as Overlap(device=n).
        runs = self._runs
        while len(runs) <= len(block_hashes):
            runs.append(Overlap(device=len(runs)))
        found = self._holders.run_lengths(block_hashes, self._live, runs)
        out = dict(zip(self._names, found))
        out.pop(None, None)  # free slots
        if self._slow:
            self._split_tiers(out, block_hashes, [o.device for o in found])
        return out

    def check(self) -> None:
        """Assert the invariants (tests call this after every step)."""
        holders: dict[int, int] = {}
        slow: dict[int, list[int]] = {}
        for name, state in self._workers.items():
            assert state.bit == 1 << state.slot
            assert self._names[state.slot] == name and self._live & state.bit
            for h, mask in state.blocks.items():
                assert 0 < mask < 8, (name, h, mask)
                holders[h] = holders.get(h, 0) | state.bit
                best = mask & -mask
                if best > 1:
                    slow.setdefault(h, [0, 0])[best // 4] |= state.bit
        self._holders.check()
        assert holders == self._holders.to_dict()
        assert {h: tuple(m) for h, m in slow.items()} == self._slow
        assert bin(self._live).count("1") == len(self._workers)

    def _split_tiers(self, out: dict[str, Overlap], block_hashes: Sequence[int],
                     lengths: list[int]) -> None:
        """Move each block counted as device to the tier its worker's fastest copy is in."""
        counts: dict[int, list[int]] = {}  # slot -> [host, disk]
        get = self._slow.get
        for i, h in enumerate(block_hashes[: max(lengths)]):
            slow = get(h)
            if slow is None:
                continue
            for t, mask in enumerate(slow):
                for slot in slots(mask):
                    if i < lengths[slot]:  # within the worker's run
                        counts.setdefault(slot, [0, 0])[t] += 1
        for slot, (host, disk) in counts.items():
            name = self._names[slot]
            out[name] = Overlap(out[name].device - host - disk, host, disk)

    # A block can sit in HBM and host DRAM at once: per worker and block a bitmask of the
    # tiers holding a copy; lookups credit the fastest one. Hot loops: locals only, one
    # map call per event, and the tier bookkeeping (`_set_best`) only when a non-device
    # tier is involved.
    def _store(self, state: _WorkerState, hashes: list[int], tier: Tier) -> None:
        tbit, bit = 1 << tier, state.bit
        blocks, setdefault = state.blocks, state.blocks.setdefault
        if tbit == 1:  # device, the common case: one pass, no tier bookkeeping
            self._holders.add([h for h in hashes if setdefault(h, 1) == 1], state.slot)
            if self._slow:  # some copies are in slower tiers only: they gain a device one
                for h in hashes:
                    old = blocks[h]
                    if not old & 1:
                        blocks[h] = old | 1
                        self._set_best(h, bit, 1)
            return
        gained = []
        for h in hashes:
            old = setdefault(h, tbit)
            if old == tbit:  # new to the worker (or already held in just this tier)
                gained.append(h)
                self._set_best(h, bit, tbit)
            elif not old & tbit:  # a copy in another tier: add this one
                new = blocks[h] = old | tbit
                if (old & -old) != (new & -new):
                    self._set_best(h, bit, new & -new)
        self._holders.add(gained, state.slot)

    def _remove(self, state: _WorkerState, hashes: list[int], tier: Tier) -> None:
        tbit, bit = 1 << tier, state.bit
        blocks, pop = state.blocks, state.blocks.pop
        lost = []
        for h in hashes:
            old = pop(h, 0)
            if old == tbit:  # its last copy: the worker no longer holds h
                lost.append(h)
                if tbit > 1:
                    self._set_best(h, bit, 0)
            elif old:  # copies in other tiers stay
                new = blocks[h] = old & ~tbit
                if (old & -old) != (new & -new):
                    self._set_best(h, bit, new & -new)
        self._holders.discard(lost, state.slot)

    def _drop_blocks(self, state: _WorkerState) -> None:
        self._holders.discard(list(state.blocks), state.slot)
        if self._slow:
            for h, mask in state.blocks.items():
                if not mask & 1:
                    self._set_best(h, state.bit, 0)
        state.blocks.clear()

    def _set_best(self, h: int, bit: int, best: int) -> None:
        """Record that the fastest copy `bit`'s worker has of h is in tier bit `best`
        (1 device, 2 host, 4 disk; 0: none)."""
        host, disk = self._slow.get(h, (0, 0))
        host = host | bit if best == 2 else host & ~bit
        disk = disk | bit if best == 4 else disk & ~bit
        if host or disk:
            self._slow[h] = (host, disk)
        else:
            self._slow.pop(h, None)


def best_tier(mask: int) -> Tier:
    return Tier((mask & -mask).bit_length() - 1)
