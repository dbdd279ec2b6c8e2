"""A read-only window on the first items of a list that only grows.

A running sequence's outputs (generated tokens, their logprobs) are reported every step.
Copying them each time costs O(tokens so far) per request per step: at 256 streams of
1000-token answers that is ~128k list items copied per step on the engine thread, which
shares the GIL with the worker's streaming. A view costs O(1) to make, reads like a list
(len, index, slice, iterate, compare) and stays a snapshot, because the lists it looks at
are only ever appended to: items past its end, appended by later steps, are not in it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


class PrefixView(Sequence[T]):
    __slots__ = ("_items", "_start", "_stop")

    def __init__(self, items: list[T], start: int, stop: int) -> None:
        self._items, self._start, self._stop = items, start, stop

    def __len__(self) -> int:
        return self._stop - self._start

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            return self._items[self._start + start : self._start + stop : step]
        n = len(self)
        if not -n <= i < n:
            raise IndexError("PrefixView index out of range")
        return self._items[self._start + (i % n)]

    def __iter__(self) -> Iterator[T]:
        items = self._items
        return (items[i] for i in range(self._start, self._stop))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PrefixView, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # like a list

    def __repr__(self) -> str:
        return repr(self[:])
