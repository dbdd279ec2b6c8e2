"""A flat pool of KV blocks with reference counts and a prefix cache.

Invariants (checked by `check_integrity`):
- every block is either in use (ref_count > 0) or in the free queue, never both;
- a free block keeps its hash and contents until it is handed out again, so a
  later request can revive it (prefix hit on a freed block);
- the free queue is in eviction order: the least recently freed block goes first,
  and callers free a sequence's blocks tail first so its prefix outlives its tail.
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
        if n > len(self._free):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if (self.on_evict is not None and block.block_hash is not None
                    and self._by_hash.get(block.block_hash) == block_id):
                self.on_evict(block_id, block.block_hash, block.token_ids)
            self._drop_hash(block)
            block.ref_count = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Release one reference each; pass a sequence's blocks tail first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
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
