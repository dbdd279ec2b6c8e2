"""BlockPool: ref counts, the LRU free queue, the prefix cache with token-checked hits, and
the events the prefix index consumes. `check_integrity()` runs after every operation."""

from __future__ import annotations

import random

import pytest

from kvtransfer.block_pool import BlockPool, OutOfBlocksError
from kvtransfer.hashing import block_hashes

BS = 4


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def __call__(self, kind: str, block_hash: int) -> None:
        self.events.append((kind, block_hash))

    def take(self) -> list[tuple[str, int]]:
        out, self.events = self.events, []
        return out


def make_pool(n: int = 8, caching: bool = True) -> tuple[BlockPool, Recorder]:
    rec = Recorder()
    return BlockPool(n, BS, caching, on_event=rec), rec


def cache_seq(pool: BlockPool, blocks: list[int], tokens: list[int]) -> list[int]:
    """Publish `blocks` as holding the full blocks of `tokens`; returns their hashes."""
    hashes = block_hashes(tokens, BS)
    for i, (b, h) in enumerate(zip(blocks, hashes)):
        pool.cache_block(b, h, tokens[i * BS : (i + 1) * BS])
    pool.check_integrity()
    return hashes


def test_allocate_and_free_ref_counts() -> None:
    pool, _ = make_pool(4)
    assert (pool.num_free, pool.num_used, pool.num_cached) == (4, 0, 0)
    a = pool.allocate(3)
    pool.check_integrity()
    assert len(set(a)) == 3 and all(pool.blocks[b].ref_count == 1 for b in a)
    assert (pool.num_free, pool.num_used) == (1, 3)
    pool.touch([a[0]])  # a second holder (a shared prefix)
    assert pool.blocks[a[0]].ref_count == 2
    pool.free(a)
    pool.check_integrity()
    assert pool.blocks[a[0]].ref_count == 1 and not pool.is_free(a[0])
    assert all(pool.is_free(b) for b in a[1:])
    pool.free([a[0]])
    pool.check_integrity()
    assert (pool.num_free, pool.num_used) == (4, 0)


def test_allocate_zero_and_exact_capacity() -> None:
    pool, _ = make_pool(3)
    assert pool.allocate(0) == []
    assert sorted(pool.allocate(3)) == [0, 1, 2]
    assert pool.num_free == 0
    pool.check_integrity()


def test_out_of_blocks_changes_nothing() -> None:
    pool, _ = make_pool(4)
    held = pool.allocate(3)
    with pytest.raises(OutOfBlocksError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    pool.check_integrity()
    assert pool.num_free == 1 and all(pool.blocks[b].ref_count == 1 for b in held)


def test_double_free_raises() -> None:
    pool, _ = make_pool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError, match=f"double free of block {b}"):
        pool.free([b])
    pool.check_integrity()
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([1 - b])  # never allocated
    pool.check_integrity()


def test_bad_pool_size() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, BS)


def test_free_queue_is_least_recently_freed_first() -> None:
    pool, _ = make_pool(6)
    blocks = pool.allocate(6)
    tokens = list(range(6 * BS))
    cache_seq(pool, blocks, tokens)
    order = [blocks[i] for i in (4, 1, 5, 0, 3, 2)]
    for b in order:
        pool.free([b])
        pool.check_integrity()
    assert pool.num_cached == 6
    # Each allocation takes the block freed longest ago.
    assert [pool.allocate(1)[0] for _ in range(6)] == order
    pool.check_integrity()


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool, _ = make_pool(4)
    blocks = pool.allocate(4)
    cache_seq(pool, blocks[:2], list(range(2 * BS)))
    # Free cached, uncached, cached, uncached: the uncached ones go first regardless.
    pool.free([blocks[0], blocks[2], blocks[1], blocks[3]])
    pool.check_integrity()
    first_two = pool.allocate(2)
    assert set(first_two) == {blocks[2], blocks[3]}
    assert pool.num_cached == 2  # nothing evicted yet
    assert pool.allocate(2) == [blocks[0], blocks[1]]
    assert pool.num_cached == 0


def test_tail_of_a_sequence_is_evicted_before_its_head() -> None:
    pool, _ = make_pool(4)
    table = pool.allocate(4)
    tokens = list(range(100, 100 + 4 * BS))
    hashes = cache_seq(pool, table, tokens)
    pool.free(list(reversed(table)))  # how KVCacheManager.free releases a sequence
    pool.check_integrity()
    (victim,) = pool.allocate(1)
    assert victim == table[-1]
    assert pool.lookup(hashes[-1], tokens[-BS:]) is None
    # The prefix survives whole.
    for i in range(3):
        assert pool.lookup(hashes[i], tokens[i * BS : (i + 1) * BS]) == table[i]


def test_revive_a_freed_cached_block() -> None:
    pool, rec = make_pool(3)
    blocks = pool.allocate(2)
    tokens = list(range(2 * BS))
    hashes = cache_seq(pool, blocks, tokens)
    pool.free(list(reversed(blocks)))
    assert pool.num_free == 3 and pool.num_cached == 2
    hit = pool.lookup(hashes[0], tokens[:BS])
    assert hit == blocks[0] and pool.is_free(hit)
    pool.touch([hit])
    pool.check_integrity()
    assert not pool.is_free(hit) and pool.blocks[hit].ref_count == 1
    assert pool.num_free == 2
    # Reviving keeps contents: the hash is still served, and no event was emitted for it.
    assert pool.lookup(hashes[0], tokens[:BS]) == hit
    assert [k for k, _ in rec.take()] == ["stored", "stored"]
    # The revived block is not handed out while held; the others are.
    assert hit not in pool.allocate(2)
    pool.check_integrity()


def test_lookup_checks_tokens_not_just_the_hash() -> None:
    pool, _ = make_pool(2)
    (b,) = pool.allocate(1)
    pool.cache_block(b, 12345, [1, 2, 3, 4])
    assert pool.lookup(12345, [1, 2, 3, 4]) == b
    assert pool.lookup(12345, (1, 2, 3, 4)) == b
    assert pool.lookup(12345, [1, 2, 3, 5]) is None  # same hash, other tokens: a collision
    assert pool.lookup(12345, [1, 2, 3]) is None
    assert pool.lookup(54321, [1, 2, 3, 4]) is None
    pool.check_integrity()


def test_stored_and_removed_events() -> None:
    pool, rec = make_pool(3)
    blocks = pool.allocate(3)
    tokens = list(range(3 * BS))
    hashes = cache_seq(pool, blocks[:2], tokens)
    assert rec.take() == [("stored", hashes[0]), ("stored", hashes[1])]
    # Re-publishing a cached block, or a duplicate of a cached hash, emits nothing.
    pool.cache_block(blocks[0], hashes[0], tokens[:BS])
    pool.cache_block(blocks[2], hashes[0], tokens[:BS])
    assert rec.take() == []
    assert pool.lookup(hashes[0], tokens[:BS]) == blocks[0]  # first holder wins
    pool.free(list(reversed(blocks)))
    assert rec.take() == []  # freeing keeps contents: still a hit
    # The private duplicate is uncached when freed, so it goes out first and silently.
    assert pool.allocate(1) == [blocks[2]]
    assert rec.take() == []
    assert pool.allocate(2) == [blocks[0], blocks[1]]  # handed out sorted
    assert rec.take() == [("removed", hashes[1]), ("removed", hashes[0])]  # evicted tail first
    pool.check_integrity()


def test_reset_prefix_cache_drops_only_free_blocks() -> None:
    pool, rec = make_pool(4)
    blocks = pool.allocate(2)
    tokens = list(range(2 * BS))
    hashes = cache_seq(pool, blocks, tokens)
    pool.free([blocks[1]])
    rec.take()
    pool.reset_prefix_cache()
    pool.check_integrity()
    assert rec.take() == [("removed", hashes[1])]
    assert pool.lookup(hashes[1], tokens[BS:]) is None
    assert pool.lookup(hashes[0], tokens[:BS]) == blocks[0]  # in use: kept


def test_prefix_caching_disabled_caches_nothing() -> None:
    pool, rec = make_pool(2, caching=False)
    blocks = pool.allocate(2)
    hashes = cache_seq(pool, blocks, list(range(2 * BS)))
    assert pool.num_cached == 0 and rec.take() == []
    assert pool.lookup(hashes[0], list(range(BS))) is None


class ModelPool:
    """The documented policy, written as plainly as possible."""

    def __init__(self, n: int) -> None:
        self.ref = [0] * n
        self.free = list(range(n))  # front = next to hand out
        self.freed_at = [0] * n
        self.clock = 0
        self.hash_of: dict[int, int] = {}  # block -> hash (including private duplicates)
        self.tokens_of: dict[int, tuple[int, ...]] = {}
        self.by_hash: dict[int, int] = {}
        self.events: list[tuple[str, int]] = []

    def _drop(self, b: int) -> None:
        h = self.hash_of.pop(b, None)
        self.tokens_of.pop(b, None)
        if h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]
            self.events.append(("removed", h))

    def _cached(self, b: int) -> bool:
        return b in self.hash_of and self.by_hash.get(self.hash_of[b]) == b

    def allocate(self, n: int) -> list[int]:
        # Cached blocks the next n evictions take anyway: after the k uncached blocks at
        # the front, the n - k cached ones freed longest ago; those freed within n - k
        # frees of the oldest are surely among them (frees of other blocks come between).
        k = next((i for i, b in enumerate(self.free) if self._cached(b)), len(self.free))
        cached = [b for b in self.free if self._cached(b)]
        due = set()
        if k < n and cached:
            oldest = min(self.freed_at[b] for b in cached)
            due = {b for b in cached if self.freed_at[b] <= oldest + (n - k) - 1}
        out: list[int] = []
        while len(out) < n:
            start = self.free.pop(0)
            out.append(start)
            for step in (-1, 1):  # free neighbours that are uncached or due anyway
                b = start + step
                while len(out) < n and b in self.free and (not self._cached(b) or b in due):
                    self.free.remove(b)
                    out.append(b)
                    b += step
        for b in sorted(out, key=lambda b: self.freed_at[b]):  # evicted in free order
            self._drop(b)
            self.ref[b] = 1
        return sorted(out)

    def free_one(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            self.clock += 1
            self.freed_at[b] = self.clock
            if b in self.hash_of and self.by_hash.get(self.hash_of[b]) == b:
                self.free.append(b)
            else:
                self._drop(b)
                self.free.insert(0, b)

    def touch(self, b: int) -> None:
        if self.ref[b] == 0:
            self.free.remove(b)
        self.ref[b] += 1

    def cache(self, b: int, h: int, tokens: tuple[int, ...]) -> None:
        if b in self.hash_of:
            return
        self.hash_of[b], self.tokens_of[b] = h, tokens
        if h not in self.by_hash:
            self.by_hash[h] = b
            self.events.append(("stored", h))

    def lookup(self, h: int, tokens: tuple[int, ...]) -> int | None:
        b = self.by_hash.get(h)
        return b if b is not None and self.tokens_of[b] == tokens else None


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_match_the_model(seed: int) -> None:
    rng = random.Random(seed)
    n = 12
    pool, rec = make_pool(n)
    model = ModelPool(n)
    held: list[int] = []  # one entry per reference we hold
    # A small universe of blocks, so hashes repeat (duplicates, hits, a forced collision).
    universe = [(1000 + i, tuple(rng.randrange(50) for _ in range(BS))) for i in range(10)]
    universe.append((1000, (9, 9, 9, 9)))  # same hash as universe[0], other tokens
    for _ in range(600):
        op = rng.choice(["alloc", "alloc", "free", "free", "cache", "hit", "reset"])
        if op == "alloc":
            k = rng.randint(1, 4)
            if k > len(model.free):
                with pytest.raises(OutOfBlocksError):
                    pool.allocate(k)
            else:
                got = pool.allocate(k)
                assert got == model.allocate(k)
                held += got
        elif op == "free" and held:
            picks = [held.pop(rng.randrange(len(held))) for _ in range(rng.randint(1, 3))
                     if held]
            pool.free(picks)
            for b in picks:
                model.free_one(b)
        elif op == "cache" and held:
            b = rng.choice(held)
            h, toks = rng.choice(universe)
            pool.cache_block(b, h, list(toks))
            model.cache(b, h, toks)
        elif op == "hit":
            h, toks = rng.choice(universe)
            hit = pool.lookup(h, toks)
            assert hit == model.lookup(h, toks)
            if hit is not None:
                assert pool.is_free(hit) == (model.ref[hit] == 0)
                pool.touch([hit])
                model.touch(hit)
                held.append(hit)
        elif op == "reset" and rng.random() < 0.1:
            pool.reset_prefix_cache()
            for b in range(n):
                if model.ref[b] == 0:
                    model._drop(b)
        pool.check_integrity()
        assert pool.num_free == len(model.free)
        assert [pool.blocks[b].ref_count for b in range(n)] == model.ref
        assert sorted(held) == sorted(b for b in range(n) for _ in range(model.ref[b]))
        assert pool.num_cached == len(model.by_hash)
        assert sorted(pool.cached_hashes()) == sorted(model.by_hash)
        assert rec.take() == model.events
        model.events.clear()
    # The whole free queue is in the model's order.
    k = pool.num_free
    rest = pool.allocate(k)
    assert rest == model.allocate(k)
    pool.free(held + rest)
    pool.check_integrity()
    assert pool.num_free == n
