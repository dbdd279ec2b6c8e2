"""Block hash -> bitmask of the workers holding the block (bit s: worker slot s): the map
behind `InMemoryPrefixIndex`, whose lookups are one probe per block of the prompt.

Two implementations of one interface. `DictBlockMap` is the plain-dict reference. Its
probes cost a few dependent cache misses each on a cold 1M-entry dict (index, entry, key
object, value), one after another: ~130 probes took a lookup to p99 150 us. `BlockMap`
(router/_block_map.c, built by `pip install -e .`) keeps the map in one flat
open-addressing table and converts and prefetches the hashes a chunk at a time, so the
misses overlap. Numpy cannot do that cheaply enough: a lookup is ~15 array calls of
2-10 us each. When the extension is not built the reference stands in, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import repeat
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class DictBlockMap:
    """The reference: a dict of the non-zero masks."""

    def __init__(self) -> None:
        self._masks: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._masks)

    def add(self, hashes: Sequence[int], slot: int) -> None:
        """Set bit `slot` in the mask of each hash (duplicates are fine)."""
        bit, masks = 1 << slot, self._masks
        get = masks.get
        for h in hashes:
            others = get(h, 0)
            masks[h] = others | bit if others else bit  # alone: one shared int

    def discard(self, hashes: Sequence[int], slot: int) -> None:
        """Clear bit `slot` for each hash; a hash left with no bit goes."""
        keep, masks = ~(1 << slot), self._masks
        for h in hashes:
            rest = masks.get(h, 0) & keep
            if rest:
                masks[h] = rest
            else:
                masks.pop(h, None)

    def run_lengths(self, hashes: Sequence[int], alive: int,
                    values: list[T] | None = None) -> list[int] | list[T]:
        """For each slot s < alive.bit_length(): how many leading hashes have bit s set (0
        where alive has not); values[that] instead when values is given. alive >= 0."""
        lengths = [0] * alive.bit_length()
        for i, mask in enumerate(map(self._masks.get, hashes, repeat(0))):
            held = mask & alive
            if held != alive:
                for s in slots(alive ^ held):
                    lengths[s] = i
                alive = held
                if not held:
                    break
        else:
            for s in slots(alive):
                lengths[s] = len(hashes)
        return lengths if values is None else [values[n] for n in lengths]

    def to_dict(self) -> dict[int, int]:
        return dict(self._masks)

    def check(self) -> None:
        assert all(self._masks.values())


def slots(mask: int) -> Iterator[int]:
    """The set bits of mask, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


try:
    from router._block_map import BlockMap
except ImportError:  # not built (no C compiler at install)
    log.warning("router._block_map is not built: the prefix index falls back to dict "
                "probes (lookups ~5x slower); `pip install -e .` builds it")
    BlockMap = DictBlockMap  # type: ignore[misc,assignment]
