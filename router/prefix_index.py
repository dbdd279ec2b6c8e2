"""Which worker holds which KV blocks, per tier, built from the workers' KV events.

`lookup(hashes)` answers, for each worker, how many *leading* blocks of a request it
holds and in which tiers: only an unbroken prefix saves prefill work. The in-memory
index serves one router; a Redis-backed one with the same interface lets several
routers share it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvtransfer.events import CLEARED, REMOVED, STORED, KVEventBatch, Tier

log = logging.getLogger(__name__)


@dataclass
class Overlap:
    """Leading blocks of a request held by one worker, split by tier."""

    device: int = 0
    host: int = 0
    disk: int = 0

    @property
    def total(self) -> int:
        return self.device + self.host + self.disk

    def add(self, tier: Tier) -> None:
        if tier == Tier.DEVICE:
            self.device += 1
        elif tier == Tier.HOST:
            self.host += 1
        else:
            self.disk += 1


@dataclass
class _WorkerState:
    instance_id: str
    last_event_id: int
    blocks: dict[int, int] = field(default_factory=dict)  # hash -> tier bitmask


class InMemoryPrefixIndex:
    def __init__(self) -> None:
        self._workers: dict[str, _WorkerState] = {}
        self._holders: dict[int, dict[str, Tier]] = {}

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
                for h in ev.block_hashes:
                    self._store(batch.worker_id, state, h, ev.tier)
            elif ev.kind == REMOVED:
                for h in ev.block_hashes:
                    self._remove(batch.worker_id, state, h, ev.tier)
            elif ev.kind == CLEARED:
                self._drop_blocks(batch.worker_id, state)
        state.last_event_id = batch.event_id
        return True

    def resync(self, worker_id: str, instance_id: str, last_event_id: int,
               blocks: list[tuple[int, Tier]]) -> None:
        """Replace what we know of a worker with its snapshot (taken at last_event_id)."""
        self.remove_worker(worker_id)
        state = _WorkerState(instance_id, last_event_id)
        self._workers[worker_id] = state
        for h, tier in blocks:
            self._store(worker_id, state, h, tier)

    def remove_worker(self, worker_id: str) -> None:
        state = self._workers.pop(worker_id, None)
        if state is not None:
            self._drop_blocks(worker_id, state)

    def lookup(self, block_hashes: list[int]) -> dict[str, Overlap]:
        out = {w: Overlap() for w in self._workers}
        alive = set(self._workers)
        for h in block_hashes:
            holders = self._holders.get(h)
            if not holders:
                break
            alive &= holders.keys()
            if not alive:
                break
            for w in alive:
                out[w].add(best_tier(holders[w]))
        return out

    # Per worker and block: a bitmask of the tiers holding a copy (a block can sit in HBM
    # and in host DRAM at once); lookups credit the fastest one.
    def _store(self, worker_id: str, state: _WorkerState, h: int, tier: Tier) -> None:
        mask = state.blocks.get(h, 0) | (1 << tier)
        state.blocks[h] = mask
        self._holders.setdefault(h, {})[worker_id] = mask

    def _remove(self, worker_id: str, state: _WorkerState, h: int, tier: Tier) -> None:
        mask = state.blocks.get(h, 0) & ~(1 << tier)
        holders = self._holders.get(h)
        if mask:
            state.blocks[h] = mask
            if holders is not None:
                holders[worker_id] = mask
            return
        state.blocks.pop(h, None)
        if holders is not None:
            holders.pop(worker_id, None)
            if not holders:
                del self._holders[h]

    def _drop_blocks(self, worker_id: str, state: _WorkerState) -> None:
        for h in state.blocks:
            holders = self._holders.get(h)
            if holders is not None:
                holders.pop(worker_id, None)
                if not holders:
                    del self._holders[h]
        state.blocks.clear()


def best_tier(mask: int) -> Tier:
    return Tier((mask & -mask).bit_length() - 1)
