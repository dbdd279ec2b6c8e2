"""KV events: what a worker tells the prefix index about its blocks. Torch-free and
msgpack-encoded, shared by workers (producers) and routers (consumers).

A worker numbers its batches 1, 2, 3...; a consumer that sees a gap (or a new
`instance_id`: the worker restarted) must resync from the worker's snapshot instead of
applying the batch, because a missed `removed` would leave a phantom hit behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import msgpack


class Tier(IntEnum):
    DEVICE = 0  # G1: GPU HBM (or the CPU worker's KV tensor)
    HOST = 1    # G2: host DRAM
    DISK = 2    # G3: NVMe files


STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


@dataclass
class KVEvent:
    kind: str  # stored | removed | cleared
    block_hashes: list[int] = field(default_factory=list)
    parent_hash: int | None = None  # stored: the hash chained before the first block
    tier: Tier = Tier.DEVICE


@dataclass
class KVEventBatch:
    worker_id: str
    instance_id: str  # changes when the worker restarts
    event_id: int  # 1, 2, 3... per instance
    events: list[KVEvent]

    def encode(self) -> bytes:
        return msgpack.packb([self.worker_id, self.instance_id, self.event_id,
                              [[e.kind, e.block_hashes, e.parent_hash, int(e.tier)]
                               for e in self.events]])

    @classmethod
    def decode(cls, data: bytes) -> KVEventBatch:
        worker_id, instance_id, event_id, events = msgpack.unpackb(data)
        return cls(worker_id, instance_id, event_id,
                   [KVEvent(k, list(h), p, Tier(t)) for k, h, p, t in events])


class EventRecorder:
    """Collects a block pool's events between flushes (one batch per engine step), so
    publishing costs one message per step, not one per block."""

    def __init__(self, worker_id: str, instance_id: str) -> None:
        self.worker_id = worker_id
        self.instance_id = instance_id
        self.next_event_id = 1
        self._pending: list[KVEvent] = []

    def record(self, kind: str, block_hash: int, tier: Tier = Tier.DEVICE) -> None:
        last = self._pending[-1] if self._pending else None
        if last is not None and last.kind == kind and last.tier == tier:
            last.block_hashes.append(block_hash)
        else:
            self._pending.append(KVEvent(kind, [block_hash], None, tier))

    def clear(self) -> None:
        self._pending.append(KVEvent(CLEARED))

    def flush(self) -> KVEventBatch | None:
        if not self._pending:
            return None
        batch = KVEventBatch(self.worker_id, self.instance_id, self.next_event_id,
                             self._pending)
        self.next_event_id += 1
        self._pending = []
        return batch
