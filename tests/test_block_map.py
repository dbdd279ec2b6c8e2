"""The C block map (router/_block_map.c) against the plain-dict reference: growth, deletion
inside collision clusters (wrapping around the table's end), hash 0 (the empty marker
inside the table) and 2**64 - 1, masks over many words, duplicates, bad input."""

from __future__ import annotations

import random

import pytest

from router.block_map import BlockMap, DictBlockMap

pytestmark = pytest.mark.skipif(BlockMap is DictBlockMap,
                                reason="router._block_map is not built")

GOLDEN = 0x9E3779B97F4A7C15  # the C file's home slot: (h * GOLDEN mod 2**64) >> shift
MAX = 2**64 - 1


def same(c: BlockMap, ref: DictBlockMap) -> None:
    c.check()  # load <= 1/2, every key reachable from its home, no empty mask
    assert c.to_dict() == ref.to_dict() and len(c) == len(ref)


def colliding(home: int, n: int, capacity: int) -> list[int]:
    """n distinct keys whose home slot is `home` in a table of `capacity` entries."""
    shift = 64 - capacity.bit_length() + 1
    inverse = pow(GOLDEN, -1, 2**64)
    return [((home << shift) | j) * inverse % 2**64 for j in range(1, n + 1)]


def test_random_operations_match_the_reference():
    rng = random.Random(0)
    pool = [0, 1, 2, 3, MAX, MAX - 1] + [rng.getrandbits(64) for _ in range(3000)]
    c, ref = BlockMap(), DictBlockMap()
    for step in range(3000):
        slot = rng.choice([0, 1, 63, 64, 65, 130, rng.randrange(320)])  # up to 5 words
        keys = rng.choices(pool[: 100 + step], k=rng.randint(0, 40))  # duplicates too
        op = c.add if rng.random() < 0.6 else c.discard
        op(keys, slot)
        getattr(ref, op.__name__)(keys, slot)
        if step % 10 == 0:
            same(c, ref)
        query = rng.choices(pool[: 100 + step], k=rng.randint(0, 30))
        alive = rng.choice([0, MAX, 2**320 - 1, (1 << 64) | 1, rng.getrandbits(140)])
        assert c.run_lengths(query, alive) == ref.run_lengths(query, alive)
        values = [f"v{i}" for i in range(len(query) + 1)]
        assert c.run_lengths(query, alive, values) == ref.run_lengths(query, alive, values)
    same(c, ref)
    assert c.capacity > 1024  # it grew


def test_deletion_keeps_colliding_keys_reachable():
    c = BlockMap()
    cap = c.capacity
    # Two clusters that run into each other, the second across the end of the table.
    keys = colliding(cap - 3, 6, cap) + colliding(cap - 1, 5, cap) + colliding(1, 3, cap)
    ref = DictBlockMap()
    for i, k in enumerate(keys):
        c.add([k], i % 3)
        ref.add([k], i % 3)
    same(c, ref)
    rng = random.Random(1)
    for k in rng.sample(keys, len(keys)):
        for s in range(3):
            c.discard([k], s)
            ref.discard([k], s)
        same(c, ref)
        assert c.run_lengths(keys, 7) == ref.run_lengths(keys, 7)
    assert len(c) == 0


def test_growth_and_shrinking_to_nothing():
    rng = random.Random(2)
    keys = [rng.getrandbits(64) for _ in range(50_000)]
    c = BlockMap()
    c.add(keys, 5)
    c.add(keys[::2], 70)
    c.check()
    assert len(c) == len(keys) and c.capacity >= 2 * len(keys)
    masks = c.to_dict()
    assert masks[keys[0]] == 1 << 5 | 1 << 70 and masks[keys[1]] == 1 << 5
    assert c.run_lengths(keys, 1 << 5 | 1 << 70) == [0] * 5 + [len(keys)] + [0] * 64 + [1]
    c.discard(keys, 5)
    c.discard(keys, 70)
    c.check()
    assert len(c) == 0 and c.to_dict() == {}


def test_zero_and_the_largest_hash():
    c = BlockMap()
    c.add([0, MAX, 0], 3)
    assert c.to_dict() == {0: 8, MAX: 8} and len(c) == 2
    assert c.run_lengths([0, MAX, 5], 8 | 1) == [0, 0, 0, 2]
    c.discard([0], 3)
    assert c.to_dict() == {MAX: 8}
    assert c.run_lengths([0], 8) == [0, 0, 0, 0]
    c.check()


def test_bad_input():
    c = BlockMap()
    with pytest.raises(OverflowError):
        c.add([-1], 0)
    with pytest.raises(OverflowError):
        c.add([2**64], 0)
    with pytest.raises(TypeError):
        c.add(["1"], 0)
    with pytest.raises(ValueError):
        c.add([1], -1)
    with pytest.raises(TypeError):
        c.run_lengths([1], 1.0)
    c.add([1, 2], 0)
    with pytest.raises(IndexError):
        c.run_lengths([1, 2], 1, ["too", "short"])
    with pytest.raises(TypeError):
        BlockMap(1)
    c.check()
