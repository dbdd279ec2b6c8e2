"""Where a prompt's KV blocks sit in a worker's pool, for the transfer benchmarks
(benchmarks/gpu_transfer.py): the block ids on the prefill and the decode side, by
placement. A transfer moves one run of consecutive ids (on both sides) per NIXL
descriptor or NCCL operation, so placement decides how many it takes."""

from __future__ import annotations

import random

from kvtransfer.block_pool import BlockPool

# contiguous: ids 0..n-1 on both sides (one run). scattered: the first n of a shuffled
# free list (about one run per block). served_lru / served_runs: a churned BlockPool's
# allocation of the prompt, one block at a time (eviction order) or as
# BlockPool.allocate hands it out (runs of neighbours).
PLACEMENTS = ("contiguous", "scattered", "served_lru", "served_runs")
SEEDS = {"prefill": 1, "decode": 2}  # each pool's free-list order


def block_ids(placement: str, n: int, role: str, num_blocks: int) -> list[int]:
    if placement == "contiguous":
        return list(range(n))
    if placement.startswith("served"):
        return served_ids(n, num_blocks, SEEDS[role], placement == "served_runs")
    free = list(range(num_blocks))
    random.Random(SEEDS[role]).shuffle(free)
    return free[:n]


def served_ids(n: int, num_blocks: int, seed: int, runs: bool) -> list[int]:
    """The blocks a pool that has served a while gives a prompt of n blocks: a
    BlockPool with prefix caching churned by sequences of 4-256 blocks that grow a
    block at a time while decoding (so sequences interleave) and end at random, then n
    allocated. `runs`: BlockPool.allocate as it is (runs of free neighbours);
    otherwise one block at a time, i.e. in eviction order alone."""
    pool = BlockPool(num_blocks, 16)
    rng = random.Random(seed)
    live: list[list[int]] = []
    stamp = 0

    def take(k: int) -> list[int]:
        nonlocal stamp
        ids = pool.allocate(k) if runs else [pool.allocate(1)[0] for _ in range(k)]
        for b in ids:  # cached under hashes nothing asks for: evicted in LRU order
            stamp += 1
            pool.cache_block(b, stamp, (stamp,))
        return ids

    for _ in range(1500):
        k = rng.randint(4, 256)
        if pool.num_free >= k + 64:
            live.append(take(k))
        for seq in live:
            if rng.random() < 0.3 and pool.num_free > 64:
                seq += take(1)
        for seq in [q for q in live if rng.random() < 0.03]:
            live.remove(seq)
            pool.free(list(reversed(seq)))
    while pool.num_free < n and live:
        pool.free(list(reversed(live.pop(rng.randrange(len(live))))))
    return take(n)
