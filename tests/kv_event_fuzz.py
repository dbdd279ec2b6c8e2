"""Random KV event traffic for the prefix-index tests: one generator, so the in-memory
index (against a naive model) and the Redis index (against the in-memory one) are fuzzed
by the same kinds of snapshots and batches."""

from __future__ import annotations

import random

from kvtransfer.events import CLEARED, REMOVED, STORED, KVEvent, Tier


def random_snapshot(rng: random.Random, pool: list[int]) -> list[tuple[int, Tier]]:
    """A prefix of the pool, each block in a random tier."""
    return [(h, Tier(rng.randrange(3))) for h in pool[: rng.randrange(len(pool))]]


def random_events(rng: random.Random, pool: list[int]) -> list[KVEvent]:
    """One batch's events: 1-4 stores/removals of short pool runs (device tier twice as
    likely), now and then a clear."""
    events = []
    for _ in range(rng.randint(1, 4)):
        a = rng.randrange(len(pool))
        kind = CLEARED if rng.random() < 0.03 else rng.choice([STORED, REMOVED])
        events.append(KVEvent(kind, [] if kind == CLEARED else pool[a : a + rng.randint(1, 8)],
                              tier=Tier(rng.choice([0, 0, 1, 2]))))
    return events
