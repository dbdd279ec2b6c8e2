"""Allocations in runs of consecutive block ids (kvtransfer/block_pool.py): a block's
free neighbours come along when they are uncached or due for eviction anyway, so a
transfer moves few runs, and the prefix cache keeps what strict LRU would keep."""

from __future__ import annotations

import random

from kvtransfer.block_pool import BlockPool
from kvtransfer.hashing import block_hashes
from kvtransfer.transfer import coalesce

BS = 4


def runs(ids: list[int]) -> int:
    return len(coalesce(ids, ids))


def test_uncached_free_neighbours_come_as_one_run() -> None:
    pool = BlockPool(16, BS)
    every = pool.allocate(16)
    pool.free([every[i] for i in (9, 3, 7, 5, 8, 4, 6)])  # freed out of order, uncached
    got = pool.allocate(5)
    assert runs(got) == 1 and got == sorted(got)
    pool.check_integrity()


def test_a_fresher_cached_neighbour_stays_cached() -> None:
    pool = BlockPool(8, BS)
    blocks = pool.allocate(8)
    tokens = list(range(8 * BS))
    hashes = block_hashes(tokens, BS)
    for i, b in enumerate(blocks):
        pool.cache_block(b, hashes[i], tokens[i * BS:(i + 1) * BS])
    pool.free([blocks[2], blocks[3]])  # oldest
    pool.free([blocks[6]])
    pool.free([blocks[4]])  # fresh, next to 3
    got = pool.allocate(2)
    assert got == [blocks[2], blocks[3]]
    assert pool.lookup(hashes[4], tokens[4 * BS:5 * BS]) == blocks[4]
    # Blocks 2 and 3 come back uncached (evicted above): they go first, then 6, the
    # oldest cached block; 4 is fresher than 6 and stays, though it borders 3.
    pool.free(got)
    assert pool.allocate(3) == [blocks[2], blocks[3], blocks[6]]
    assert pool.lookup(hashes[4], tokens[4 * BS:5 * BS]) == blocks[4]
    pool.check_integrity()


def chat(pool: BlockPool, one_at_a_time: bool, seed: int) -> tuple[float, float]:
    """A multi-turn chat against a pool holding about half its working set: prefix hit
    ratio, and blocks per run of what each turn allocated."""
    rng = random.Random(seed)
    systems = [[("system", s, i) for i in range(48)] for s in range(6)]
    convs = [list(rng.choice(systems)) for _ in range(50)]
    turns = [0] * 50
    arrivals = sorted((rng.uniform(0, 10), i) for i in range(50))
    live: list[tuple[float, list[int]]] = []
    hit = total = allocated = runs_allocated = 0
    while arrivals:
        now, i = arrivals.pop(0)
        for item in [x for x in live if x[0] <= now]:
            live.remove(item)
            pool.free(list(reversed(item[1])))
        conv = convs[i]
        conv += [("user", i, turns[i], j) for j in range(rng.randint(4, 24))]
        keys = [hash(tuple(conv[: k + 1])) & (2**63 - 1) for k in range(len(conv))]
        table: list[int] = []
        for k, key in enumerate(keys):
            b = pool.lookup(key, (k,))
            if b is None:
                break
            table.append(b)
        pool.touch(table)
        need = len(conv) - len(table)
        if need + 8 > pool.num_free:
            pool.free(list(reversed(table)))
            continue
        hit, total = hit + len(table), total + len(conv)
        new = ([pool.allocate(1)[0] for _ in range(need)] if one_at_a_time
               else pool.allocate(need))
        if turns[i] > 0 or i > 10:  # after the first arrivals have churned the pool
            allocated, runs_allocated = allocated + need, runs_allocated + runs(new)
        for k, b in enumerate(new, start=len(table)):
            pool.cache_block(b, keys[k], (k,))
        live.append((now + rng.uniform(0.5, 3), table + new))
        turns[i] += 1
        conv += [("assistant", i, turns[i])]
        if turns[i] < 8:
            arrivals.append((now + rng.uniform(1, 6), i))
            arrivals.sort()
    pool.check_integrity()
    return hit / total, allocated / runs_allocated


def test_chat_turns_get_long_runs_at_the_same_hit_ratio() -> None:
    for seed in range(3):
        strict_hits, strict_run = chat(BlockPool(4000, BS), one_at_a_time=True, seed=seed)
        hits, run = chat(BlockPool(4000, BS), one_at_a_time=False, seed=seed)
        assert strict_run < 2.5  # eviction order alone: scattered
        assert run > 3 * strict_run
        assert hits >= strict_hits - 0.005
