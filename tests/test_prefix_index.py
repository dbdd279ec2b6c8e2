"""Prefix index: events applied in order, duplicates ignored, gaps and restarts force a
resync, tiers tracked per copy, lookups count only an unbroken leading run."""

from __future__ import annotations

import random

import pytest

from kvtransfer.events import (
    CLEARED,
    REMOVED,
    STORED,
    EventRecorder,
    KVEvent,
    KVEventBatch,
    Tier,
)
from kvtransfer.hashing import block_hashes
from router import prefix_index
from router.block_map import BlockMap, DictBlockMap
from router.prefix_index import InMemoryPrefixIndex, Overlap, best_tier
from tests.kv_event_fuzz import random_events, random_snapshot

H = block_hashes(list(range(64)), 16)  # 4 chained hashes


def batch(worker: str, eid: int, *events: KVEvent, instance: str = "i1") -> KVEventBatch:
    return KVEventBatch(worker, instance, eid, list(events))


def fresh(*workers: str) -> InMemoryPrefixIndex:
    idx = InMemoryPrefixIndex()
    for w in workers:
        idx.resync(w, "i1", 0, [])
    return idx


def test_stored_then_lookup_counts_leading_blocks():
    idx = fresh("w1", "w2")
    assert idx.apply(batch("w1", 1, KVEvent(STORED, H[:3])))
    assert idx.apply(batch("w2", 1, KVEvent(STORED, [H[0], H[2], H[3]])))
    got = idx.lookup(H)
    assert got["w1"] == Overlap(device=3)
    assert got["w2"] == Overlap(device=1)  # H[1] missing: the run stops there


def test_removed_and_cleared():
    idx = fresh("w1")
    idx.apply(batch("w1", 1, KVEvent(STORED, H)))
    idx.apply(batch("w1", 2, KVEvent(REMOVED, [H[1]])))
    assert idx.lookup(H)["w1"].total == 1
    idx.apply(batch("w1", 3, KVEvent(CLEARED)))
    assert idx.lookup(H)["w1"].total == 0 and idx.num_blocks("w1") == 0


def test_gap_unknown_worker_and_restart_need_resync():
    idx = fresh("w1")
    assert idx.apply(batch("w1", 1, KVEvent(STORED, H[:1])))
    assert idx.apply(batch("w1", 1, KVEvent(STORED, H[:1])))  # duplicate: fine
    assert not idx.apply(batch("w1", 3, KVEvent(STORED, H[1:2])))  # 2 was lost
    assert idx.lookup(H)["w1"].total == 1  # the batch after the gap was not applied
    assert not idx.apply(batch("w9", 1, KVEvent(STORED, H)))  # never synced
    assert not idx.apply(batch("w1", 2, KVEvent(STORED, H), instance="i2"))  # restarted
    idx.resync("w1", "i2", 5, [(h, Tier.DEVICE) for h in H[:2]])
    assert idx.lookup(H)["w1"].total == 2
    assert idx.apply(batch("w1", 6, KVEvent(STORED, H[2:]), instance="i2"))
    assert idx.lookup(H)["w1"].total == 4


def test_tiers_credit_the_fastest_copy():
    idx = fresh("w1")
    idx.apply(batch("w1", 1, KVEvent(STORED, H[:2], tier=Tier.DEVICE),
                    KVEvent(STORED, H[2:3], tier=Tier.HOST),
                    KVEvent(STORED, H[3:], tier=Tier.DISK)))
    assert idx.lookup(H)["w1"] == Overlap(device=2, host=1, disk=1)
    # H[0] offloaded to host, then evicted from device: still held, now in host.
    idx.apply(batch("w1", 2, KVEvent(STORED, H[:1], tier=Tier.HOST),
                    KVEvent(REMOVED, H[:1], tier=Tier.DEVICE)))
    assert idx.lookup(H)["w1"] == Overlap(device=1, host=2, disk=1)


def test_remove_worker_forgets_its_blocks():
    idx = fresh("w1", "w2")
    idx.apply(batch("w1", 1, KVEvent(STORED, H)))
    idx.apply(batch("w2", 1, KVEvent(STORED, H)))
    idx.remove_worker("w1")
    assert set(idx.lookup(H)) == {"w2"}


def test_recorder_batches_and_numbers_events_and_msgpack_round_trips():
    rec = EventRecorder("w1", "i1")
    assert rec.flush() is None
    for h in H[:3]:
        rec.record(STORED, h)
    rec.record(REMOVED, H[0])
    b1 = rec.flush()
    assert b1.event_id == 1 and [e.kind for e in b1.events] == [STORED, REMOVED]
    assert b1.events[0].block_hashes == H[:3]
    rec.clear()
    b2 = KVEventBatch.decode(rec.flush().encode())
    assert b2.event_id == 2 and b2.events[0].kind == CLEARED
    again = KVEventBatch.decode(b1.encode())
    assert again == b1


def test_many_workers_and_reused_slots():
    """More workers than a machine word has bits; a removed worker's slot is reused."""
    idx = fresh(*(f"w{i}" for i in range(70)))
    for i in range(70):
        assert idx.apply(batch(f"w{i}", 1, KVEvent(STORED, H[: i % 5])))
    assert {w: o.total for w, o in idx.lookup(H).items()} == {
        f"w{i}": i % 5 for i in range(70)}
    idx.remove_worker("w3")
    idx.resync("w70", "i1", 0, [(h, Tier.HOST) for h in H])
    got = idx.lookup(H)
    assert "w3" not in got and got["w70"] == Overlap(host=4) and got["w69"].total == 4
    idx.check()
    assert InMemoryPrefixIndex().lookup(H) == {}


def test_duplicates_and_back_and_forth_in_one_batch():
    """Hashes repeated within an event, and a block stored, removed and stored again
    within one batch; hash 0 and 2**64 - 1 are blocks like any other."""
    idx = fresh("w1", "w2")
    hs = [0, *H[:2], 2**64 - 1]
    assert idx.apply(batch("w1", 1, KVEvent(STORED, [hs[0], hs[0], hs[1], hs[0]]),
                           KVEvent(REMOVED, [hs[1], hs[1]]),
                           KVEvent(STORED, hs + hs)))
    assert idx.apply(batch("w2", 1, KVEvent(STORED, hs[:3]), KVEvent(REMOVED, [hs[0]] * 3),
                           KVEvent(STORED, [hs[0]]), KVEvent(REMOVED, [hs[2], hs[2]])))
    idx.check()
    assert idx.num_blocks("w1") == 4 and idx.num_blocks("w2") == 2
    assert idx.lookup(hs) == {"w1": Overlap(device=4), "w2": Overlap(device=2)}
    assert idx.apply(batch("w1", 2, KVEvent(REMOVED, [0, 0]), KVEvent(STORED, [0, 0])))
    assert idx.apply(batch("w1", 3, KVEvent(STORED, [0], tier=Tier.HOST),
                           KVEvent(REMOVED, [0]), KVEvent(STORED, [0])))
    idx.check()
    assert idx.lookup(hs)["w1"] == Overlap(device=4)


def naive_lookup(model: dict[str, dict[int, int]], hashes: list[int]) -> dict[str, Overlap]:
    out = {}
    for w, blocks in model.items():
        counts = [0, 0, 0]
        for h in hashes:
            if h not in blocks:
                break
            counts[best_tier(blocks[h])] += 1
        out[w] = Overlap(*counts)
    return out


@pytest.mark.parametrize("block_map", [BlockMap, DictBlockMap],
                         ids=["c" if BlockMap is not DictBlockMap else "c-not-built", "dict"])
def test_random_events_match_a_naive_model(monkeypatch, block_map):
    """Worker bitmasks, tier bookkeeping and slot reuse against a dict-of-dicts model, with
    each implementation of the hash -> workers map."""
    monkeypatch.setattr(prefix_index, "BlockMap", block_map)
    rng = random.Random(0)
    pool = block_hashes(list(range(16 * 24)), 16)
    idx, model, eids = InMemoryPrefixIndex(), {}, {}
    for _ in range(2000):
        w = f"w{rng.randrange(6)}"
        r = rng.random()
        if w not in model or r < 0.02:
            snap = random_snapshot(rng, pool)
            idx.resync(w, "i1", 0, snap)
            model[w], eids[w] = {}, 0
            for h, t in snap:
                model[w][h] = model[w].get(h, 0) | 1 << t
        elif r < 0.04:
            idx.remove_worker(w)
            del model[w]
        else:
            events = random_events(rng, pool)
            for ev in events:
                blocks = model[w]
                if ev.kind == CLEARED:
                    blocks.clear()
                for h in ev.block_hashes:
                    mask = blocks.get(h, 0)
                    mask = mask | 1 << ev.tier if ev.kind == STORED else mask & ~(1 << ev.tier)
                    if mask:
                        blocks[h] = mask
                    else:
                        blocks.pop(h, None)
            eids[w] += 1
            assert idx.apply(batch(w, eids[w], *events))
        idx.check()
        query = pool[: rng.randrange(len(pool) + 1)]
        if query and rng.random() < 0.3:
            query[rng.randrange(len(query))] = 12345  # a block nobody holds
        assert idx.lookup(query) == naive_lookup(model, query)
    assert any(o.host or o.disk for o in idx.lookup(pool).values())
