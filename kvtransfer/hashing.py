"""Chained 64-bit block hashes: h_i = H(h_{i-1}, tokens_i, extra).

One function for router and workers on every machine: xxh3-64 with a fixed seed
over a fixed little-endian byte encoding (never Python's `hash()`, which is salted
per process). Only full blocks are hashed. A hash only nominates a block: a worker
compares token ids before reusing it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

HASH_SEED = 0x6261746F6E  # "baton"
ROOT_PARENT_HASH = 0


def hash_block(parent_hash: int, token_ids: Sequence[int], extra_key: bytes = b"") -> int:
    h = xxhash.xxh3_64(seed=HASH_SEED)
    h.update(struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra_key:
        h.update(extra_key)
    return h.intdigest()


def block_hashes(token_ids: Sequence[int], block_size: int, extra_key: bytes = b"",
                 start: int = 0, parent_hash: int = ROOT_PARENT_HASH) -> list[int]:
    """Hashes of the full blocks of `token_ids` from block index `start` on, chained from
    `parent_hash` (the hash of block start-1), so callers can extend incrementally.

    Same bytes as `hash_block` per block, but the tokens are packed once and each block is
    one-shot hashed: ~10x faster for a 4k-token prompt, which the router hashes per request.
    """
    n = len(token_ids) // block_size
    if n <= start:
        return []
    lo = start * block_size
    packed = struct.pack(f"<{(n - start) * block_size}I", *token_ids[lo : n * block_size])
    step = 4 * block_size
    pack_parent = _PARENT.pack
    digest = xxhash.xxh3_64_intdigest
    out: list[int] = []
    parent = parent_hash
    for off in range(0, len(packed), step):
        parent = digest(pack_parent(parent) + packed[off : off + step] + extra_key,
                        seed=HASH_SEED)
        out.append(parent)
    return out


_PARENT = struct.Struct("<Q")
