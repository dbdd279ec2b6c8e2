"""Sequence-level block bookkeeping over a `BlockPool`: prefix lookup, growing a
sequence's block table as its computed tokens catch up, and caching full blocks."""

from __future__ import annotations

from collections.abc import Iterable

from engine.sequence import Sequence
from kvtransfer.block_pool import BlockPool
from kvtransfer.events import Tier
from kvtransfer.hashing import ROOT_PARENT_HASH, block_hashes
from kvtransfer.tiered_store import TieredStore


class KVCacheManager:
    def __init__(self, pool: BlockPool, extra_key: bytes = b"",
                 tiers: TieredStore | None = None) -> None:
        self.pool = pool
        self.tiers = tiers
        self.block_size = pool.block_size
        self.extra_key = extra_key
        # Measured by the engine (moving average over prefill-sized steps): what computing
        # one block costs, against which disk hits are weighed.
        self.recompute_s_per_block: float | None = None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extend_hashes(self, seq: Sequence, upto_tokens: int) -> None:
        """Make seq.block_hashes cover every full block within the first `upto_tokens`."""
        have = len(seq.block_hashes)
        want = upto_tokens // self.block_size
        if want > have:
            parent = seq.block_hashes[-1] if have else ROOT_PARENT_HASH
            seq.block_hashes.extend(block_hashes(
                seq.token_ids[: want * self.block_size], self.block_size, self.extra_key,
                start=have, parent_hash=parent))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Leading blocks of `seq` already cached. At least one token is always left to
        compute (its logits give the next token), so a fully cached prompt hits one
        block less."""
        if not self.pool.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # (prompt logprobs need every prompt position's logits)
        max_tokens = seq.num_tokens - 1
        self._extend_hashes(seq, max_tokens)
        hits: list[int] = []
        bs = self.block_size
        n = max_tokens // bs
        for i in range(n):
            block_id = self.pool.lookup(seq.block_hashes[i], seq.token_ids[i * bs : (i + 1) * bs])
            if block_id is None:
                break
            hits.append(block_id)
        if self.tiers is not None and len(hits) < n:
            self._onboard(seq, hits, n)
        return hits

    def _onboard(self, seq: Sequence, hits: list[int], n: int) -> None:
        """Extend `hits` with blocks found in host memory or on disk, copied into fresh
        device blocks that are then cached like any other. Hits are held while blocks
        are allocated, so making room never evicts the prefix being assembled."""
        assert self.tiers is not None
        bs = self.block_size
        self.pool.touch(hits)
        held = list(hits)
        try:
            for i in range(len(hits), n):
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                tier = self.tiers.lookup(seq.block_hashes[i], tokens)
                if tier is None or self.pool.num_free == 0 or (
                        tier == Tier.DISK and not self.tiers.disk_ready(
                            seq.block_hashes[i:n], tokens, self.recompute_s_per_block)):
                    break
                block_id = self.pool.allocate(1)[0]
                held.append(block_id)
                if not self.tiers.load(seq.block_hashes[i], tokens, block_id):
                    break
                self.pool.cache_block(block_id, seq.block_hashes[i], tokens)
                hits.append(block_id)
        finally:
            self.pool.free(list(reversed(held)))

    def prefetch(self, seqs: Iterable[Sequence], new_pass: bool = True) -> None:
        """Start reading ahead the disk blocks these waiting sequences (in admission order)
        would hit, while staging room lasts, so their admission copies from host memory
        instead of reading files. The walk is `find_cached_prefix`'s (device hits, then
        lower-tier hits up to the first miss), device hits by hash alone: a hint, which
        admission checks. `new_pass`: these are all the sequences worth reading for now
        (what earlier passes asked for and this one does not may go)."""
        if self.tiers is None or not self.tiers.prefetching or not self.pool.enable_prefix_caching:
            return
        if new_pass:
            self.tiers.begin_prefetch_pass()
        bs = self.block_size
        for seq in seqs:
            if seq.block_table or seq.params.prompt_logprobs is not None:
                continue  # (scoring a prompt computes it all: nothing to read ahead)
            max_tokens = seq.num_tokens - 1
            self._extend_hashes(seq, max_tokens)
            # Hashes suffice for a hint and keep long prompts cheap (this runs every step).
            # The device evicts tails first: a held last block means a held prefix.
            n, start = max_tokens // bs, 0
            if n == 0 or self.pool.holds(seq.block_hashes[n - 1]):
                continue
            while start < n and self.pool.holds(seq.block_hashes[start]):
                start += 1
            for i in range(start, n):
                tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
                tier = self.tiers.lookup(seq.block_hashes[i], tokens)
                if tier is None:
                    break
                if tier == Tier.DISK and not self.tiers.prefetch(seq.block_hashes[i], tokens):
                    return  # staging is full

    def allocate(self, seq: Sequence, num_new_tokens: int,
                 cached_blocks: list[int] | None = None) -> bool:
        """Give `seq` blocks for `num_new_tokens` more computed tokens (after taking
        `cached_blocks` as its prefix, on first schedule). False, with nothing changed,
        when the pool cannot cover it."""
        if not cached_blocks and (seq.num_computed_tokens + num_new_tokens
                                  <= len(seq.block_table) * self.block_size):
            return True  # the blocks it has cover them (most decode steps)
        cached_blocks = cached_blocks or []
        revived = sum(1 for b in cached_blocks if self.pool.is_free(b))
        total_tokens = seq.num_computed_tokens + len(cached_blocks) * self.block_size \
            + num_new_tokens
        new = self.blocks_needed(total_tokens) - len(seq.block_table) - len(cached_blocks)
        if max(new, 0) + revived > self.pool.num_free:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            seq.block_table.extend(cached_blocks)
            seq.num_computed_tokens += len(cached_blocks) * self.block_size
        if new > 0:
            seq.block_table.extend(self.pool.allocate(new))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish blocks whose every token now has KV, so other requests can share them."""
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        if full <= seq.num_published_blocks:
            return  # nothing newly full (published blocks are hashed already)
        self._extend_hashes(seq, seq.num_computed_tokens)
        for i in range(seq.num_published_blocks, full):
            block = self.pool.blocks[seq.block_table[i]]
            if block.block_hash is None:
                self.pool.cache_block(block.block_id, seq.block_hashes[i],
                                      seq.token_ids[i * bs : (i + 1) * bs])
        seq.num_published_blocks = max(seq.num_published_blocks, full)

    def free(self, seq: Sequence) -> None:
        self.pool.free(list(reversed(seq.block_table)))
        seq.block_table.clear()
        seq.block_table_epoch += 1
        seq.num_published_blocks = 0
