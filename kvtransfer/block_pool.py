"""A flat pool of KV blocks with reference counts and a prefix cache.

Invariants (checked by `check_integrity`):
- every block is either in use (ref_count > 0) or in the free queue, never both;
- a free block keeps its hash and contents until it is handed out again, so a
  later request can revive it (prefix hit on a freed block);
- the free queue is in eviction order: the least recently freed block goes first,
  and callers free a sequence's blocks tail first so its prefix outlives its tail;
- allocate(n) takes no cached block that the next n evictions in that order would
  not take: it may take other blocks than strict LRU would, but never a fresher
  cached one.

Allocations come in runs of consecutive block ids where that costs nothing: after
the front of the queue, allocate(n) takes the free neighbours of each block it takes
that are uncached or due for eviction within those n anyway, and hands the blocks out
sorted. A transfer moves one run per descriptor (NIXL) or operation (NCCL), and a pool
that hands out blocks in eviction order alone fragments within minutes of serving: a
simulated chat workload (whole turns allocated at once) got 2.2 blocks per run that way
and 11.5 with runs, at the same prefix hit ratio (tests/test_block_pool_runs.py; the
policy is checked against a plain model in tests/test_block_pool.py). It gains little
where decode steps, a block at a time, interleave sequences and every free block is
cached and young: 1.1-1.4 blocks per run (benchmarks/gpu_transfer.py's served_* blocks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify hits (a hash only nominates)


# (kind, block_hash) with kind "stored" or "removed": what the prefix index needs.
BlockEventSink = Callable[[str, int], None]
# (block_id, block_hash, token_ids) of a cached block about to be reused: the last chance
# to copy its contents down a tier (kvtransfer.tiered_store).
EvictionSink = Callable[[int, int, tuple[int, ...]], None]


class OutOfBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 on_event: BlockEventSink | None = None,
                 on_evict: EvictionSink | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # When each block was last freed (a counter): the queue's cached blocks are in
        # this order, so it tells how soon a cached block is due for eviction.
        self._freed_at = [0] * num_blocks
        self._clock = 0
        self._by_hash: dict[int, int] = {}
        self._on_event = on_event
        self.on_evict = on_evict

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def lookup(self, block_hash: int, token_ids: Sequence[int]) -> int | None:
        """Block holding exactly these tokens after this hash chain, if cached."""
        block_id = self._by_hash.get(block_hash)
        if block_id is None:
            return None
        if self.blocks[block_id].token_ids != tuple(token_ids):
            return None  # a 64-bit collision: never serve another prompt's KV
        return block_id

    def holds(self, block_hash: int) -> bool:
        """Some block is cached under this hash: a hint only (`lookup` checks the tokens)."""
        return block_hash in self._by_hash

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks (reviving them from the free queue)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def allocate(self, n: int) -> list[int]:
        """n blocks, sorted by id, in runs of consecutive ids where possible (see the
        module docstring); evicted cached blocks are reported to `on_evict` first."""
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        horizon = self._eviction_horizon(n)
        out: list[int] = []
        while len(out) < n:
            block_id, _ = self._free.popitem(last=False)
            out.append(block_id)
            for step in (-1, 1):  # the run around it
                b = block_id + step
                while len(out) < n and 0 <= b < self.num_blocks and b in self._free and (
                        self.blocks[b].block_hash is None or self._freed_at[b] <= horizon):
                    del self._free[b]
                    out.append(b)
                    b += step
        # Evicted in the order they were freed (a tier below keeps a prefix longest when
        # it arrives after its tail), handed out by id.
        for block_id in sorted(out, key=self._freed_at.__getitem__):
            self._take(block_id)
        out.sort()
        return out

    def _eviction_horizon(self, n: int) -> int:
        """Cached free blocks freed at or before this stamp are among those the next n
        evictions take anyway (the queue's uncached front goes first; -1: none are)."""
        for i, block_id in enumerate(self._free):
            if i >= n:
                return -1
            if self.blocks[block_id].block_hash is not None:
                return self._freed_at[block_id] + (n - i) - 1
        return -1

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if (self.on_evict is not None and block.block_hash is not None
                and self._by_hash.get(block.block_hash) == block_id):
            self.on_evict(block_id, block.block_hash, block.token_ids)
        self._drop_hash(block)
        block.ref_count = 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Release one reference each; pass a sequence's blocks tail first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._clock += 1
                self._freed_at[block_id] = self._clock
                reachable = block.block_hash is not None and \
                    self._by_hash.get(block.block_hash) == block_id
                if not reachable:  # nothing can hit it: hand it out before cached ones
                    self._drop_hash(block)
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)
                else:
                    self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: int, token_ids: Sequence[int]) -> None:
        """Mark a full, computed block as reusable under `block_hash`."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        if block_hash not in self._by_hash:  # first holder wins; duplicates stay private
            self._by_hash[block_hash] = block_id
            self._emit("stored", block_hash)

    def cached_hashes(self) -> list[int]:
        """Every hash a lookup can hit now (the snapshot a prefix index resyncs from)."""
        return list(self._by_hash)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0:
                self._drop_hash(block)

    def _drop_hash(self, block: Block) -> None:
        if block.block_hash is not None and self._by_hash.get(block.block_hash) == block.block_id:
            del self._by_hash[block.block_hash]
            self._emit("removed", block.block_hash)
        block.block_hash = None
        block.token_ids = None

    def _emit(self, kind: str, block_hash: int) -> None:
        if self._on_event is not None:
            self._on_event(kind, block_hash)

    def check_integrity(self) -> None:
        used = [b for b in self.blocks if b.ref_count > 0]
        assert all(b.ref_count >= 0 for b in self.blocks), "negative ref count"
        assert all(b.block_id not in self._free for b in used), "used block in free queue"
        assert len(used) + len(self._free) == self.num_blocks, "blocks lost"
        for h, block_id in self._by_hash.items():
            assert self.blocks[block_id].block_hash == h, "hash map out of sync"
