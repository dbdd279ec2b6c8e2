"""G3 read-ahead: disk blocks that a waiting request will hit are read on a background
thread into a bounded staging area in host memory (pinned on a GPU), so that admitting
the request costs a host->device copy instead of a file read on the engine thread.

Ownership: the engine thread owns all bookkeeping (entries, free slots); the reader
thread only reads a file into the slot it was handed, checks it (header, identity,
token ids, checksum: `DiskTier.read_into`) and sets the entry's `done`. A slot is in
exactly one place: free, held by an entry, or `busy` (a non-blocking copy out of it still
in flight, GPU only). An entry gives its slot back only once its read has finished, so
the reader never writes a slot that anyone reads.

Entries live while scheduling passes want them (`epoch`): a finished entry that the latest
pass did not ask for (its request was admitted, aborted, or found the block elsewhere)
gives its slot to the next read. Staging never grows: when every slot is wanted, further
blocks are not read ahead (an admission reads them itself, if that beats recomputing).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvtransfer.disk_tier import DiskTier

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Fetch:
    block_hash: int
    tokens: tuple[int, ...]
    slot: int
    order: int  # submission number: the reader works in this order
    epoch: int  # the last scheduling pass that wanted it
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None  # set by the reader before `done`
    seconds: float = 0.0  # the read and its checks, measured on the reader

    @property
    def ready(self) -> bool:
        return self.done.is_set() and self.error is None


class DiskPrefetcher:
    def __init__(self, disk: DiskTier, block_shape: tuple[int, ...], dtype: torch.dtype,
                 num_slots: int, pin: bool) -> None:
        self.disk = disk
        self.staging = torch.empty((num_slots, *block_shape), dtype=dtype, pin_memory=pin)
        self._views = [memoryview(s.view(-1).view(torch.uint8).numpy()) for s in self.staging]
        self._free = list(range(num_slots - 1, -1, -1))
        self._busy: list[tuple[int, torch.cuda.Event]] = []  # copies out still in flight
        self.entries: OrderedDict[int, Fetch] = OrderedDict()  # least recently wanted first
        self._reads: queue.SimpleQueue[Fetch | None] = queue.SimpleQueue()
        self.submitted = 0
        self._finished = 0  # written by the reader only
        # What one read costs the reader (moving average; written by the reader only):
        # measured on every read, used or not, so it stays fresh where admissions rarely
        # wait (a GPU recomputes faster than it reads).
        self.read_s_per_block: float | None = None
        self.epoch = 0
        self.unused = 0  # read, then given up for another read without being loaded
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name="baton-disk-kv-read")
        self._reader.start()

    def begin_pass(self) -> None:
        """A scheduling pass starts: entries it does not ask for again become reusable."""
        self.epoch += 1

    def submit(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        """Read the block ahead (or keep the entry already there); False when no slot is
        free: every one is being read or wanted by this pass."""
        f = self.entries.get(block_hash)
        if f is not None:
            if f.tokens != tokens:
                return False
            f.epoch = self.epoch
            self.entries.move_to_end(block_hash)
            return True
        slot = self._take_slot()
        if slot is None:
            return False
        f = Fetch(block_hash, tokens, slot, self.submitted, self.epoch)
        self.submitted += 1
        self.entries[block_hash] = f
        self._reads.put(f)
        return True

    def get(self, block_hash: int, tokens: tuple[int, ...]) -> Fetch | None:
        """The entry for exactly this block, unless its read has failed (then it is
        settled and dropped here)."""
        f = self.entries.get(block_hash)
        if f is None or f.tokens != tokens:
            return None
        if f.done.is_set() and f.error is not None:
            self._discard(f)
            return None
        return f

    def take(self, f: Fetch, dst: torch.Tensor | Callable[[torch.Tensor], None]) -> None:
        """Copy a ready entry into `dst` (a device block), or hand it to `dst` (a function
        that has copied it when it returns: under TP, the scatter to every rank), and give
        its slot back."""
        assert f.ready and self.entries.get(f.block_hash) is f
        del self.entries[f.block_hash]
        if callable(dst):
            dst(self.staging[f.slot])
            self._free.append(f.slot)
            return
        dst.copy_(self.staging[f.slot], non_blocking=True)
        if dst.is_cuda:  # the slot is reused only once the copy out of it has run
            ev = torch.cuda.Event()
            ev.record()
            self._busy.append((f.slot, ev))
        else:
            self._free.append(f.slot)

    def wait_budget(self, chain: Sequence[int], disk_s: float | None,
                    recompute_s: float | None) -> float | None:
        """Seconds worth waiting for the read of `chain[0]` (in flight), or None when
        recomputing is cheaper. Waiting until block j of the run of read-ahead blocks is
        in saves recomputing blocks 0..j and costs the reads still ahead of it (the reader
        works in order, `read_s_per_block` each, else `disk_s`); no wait may cost more
        than the whole run saves."""
        disk_s = self.read_s_per_block or disk_s
        run, eta, worth = 0, 0.0, disk_s is None
        for h in chain:
            f = self.entries.get(h)
            if f is None:
                break
            run += 1
            if disk_s is not None and not f.done.is_set():
                eta = max(eta, (f.order - self._finished + 1) * disk_s)
            worth = worth or (recompute_s is not None and run * recompute_s > eta)
        if recompute_s is None:
            return 1.0  # nothing measured yet: take the disk (like disk_worth_it), bounded
        return run * recompute_s if worth else None

    def _take_slot(self) -> int | None:
        self._reclaim()
        if not self._free:
            for f in self.entries.values():  # least recently wanted first
                if f.done.is_set() and (f.error is not None or f.epoch < self.epoch):
                    self._discard(f)
                    break
        return self._free.pop() if self._free else None

    def _reclaim(self) -> None:
        if self._busy:
            done = [s for s, ev in self._busy if ev.query()]
            self._busy = [(s, ev) for s, ev in self._busy if s not in done]
            self._free += done

    def _discard(self, f: Fetch) -> None:
        """Give a finished entry's slot back. A failed read of a block the disk tier still
        lists (and is not writing) means a bad or vanished file: dropped like a bad read
        on the engine thread. A block evicted meanwhile is simply gone."""
        del self.entries[f.block_hash]
        self._free.append(f.slot)
        if f.error is None:
            self.unused += 1
        elif f.block_hash in self.disk and not self.disk.is_pending(f.block_hash):
            self.disk.drop_bad(f.block_hash, f.error)

    def _read_loop(self) -> None:
        while (f := self._reads.get()) is not None:
            t0 = time.perf_counter()
            try:
                tokens = self.disk.read_into(f.block_hash, self._views[f.slot])
                if tokens != f.tokens:
                    raise ValueError("holds another block")
            except Exception as e:  # the thread must live on; the engine thread decides
                f.error = e
            f.seconds = time.perf_counter() - t0
            if f.error is None:
                prev = self.read_s_per_block
                self.read_s_per_block = f.seconds if prev is None else \
                    0.9 * prev + 0.1 * f.seconds
            self._finished += 1
            f.done.set()

    def drain(self) -> None:
        """Wait for every read in flight and copy out of staging (tests, shutdown)."""
        for f in list(self.entries.values()):
            f.done.wait()
        for _, ev in self._busy:
            ev.synchronize()
        self._reclaim()

    def check_integrity(self) -> None:
        slots = self._free + [s for s, _ in self._busy] + [f.slot for f in self.entries.values()]
        assert sorted(slots) == list(range(len(self.staging))), "staging slots lost or shared"

    def close(self) -> None:
        self._reads.put(None)
        self._reader.join(timeout=5)
