"""Block hashes: the one function router and workers share to name KV blocks. They must be
equal in every process, chained (a block's hash names its whole prefix), defined only for
full blocks, and cheap to extend incrementally as a sequence grows."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvtransfer.hashing import ROOT_PARENT_HASH, block_hashes, hash_block

BS = 4
ROOT = Path(__file__).resolve().parents[1]


def _tokens(n: int, seed: int = 0, vocab: int = 150_000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _run(code: str) -> str:
    """Run `code` in a fresh interpreter (its own hash salt) and return its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True, cwd=ROOT)
    return proc.stdout


def test_same_hashes_in_another_process() -> None:
    tokens = _tokens(37)
    extra = b"lora:7"
    mine = [block_hashes(tokens, BS), block_hashes(tokens, BS, extra_key=extra)]
    out = _run(
        "import json\n"
        "from kvtransfer.hashing import block_hashes\n"
        f"t = {tokens!r}\n"
        f"print(json.dumps([block_hashes(t, {BS}), block_hashes(t, {BS}, extra_key={extra!r})]))"
    )
    assert json.loads(out) == mine


def test_pinned_values() -> None:
    """A change of seed or byte encoding would split a router and workers running different
    builds, so it must be deliberate: update these numbers with it."""
    assert hash_block(ROOT_PARENT_HASH, [1, 2, 3, 4]) == 0x30CDB90C246E54F9
    assert hash_block(ROOT_PARENT_HASH, (1, 2, 3, 4)) == 0x30CDB90C246E54F9
    assert block_hashes(list(range(8)), 4, extra_key=b"x") == [
        4013390724934880269, 9435099721124373230]


def test_chaining_changes_every_later_hash() -> None:
    tokens = _tokens(6 * BS)
    base = block_hashes(tokens, BS)
    changed = list(tokens)
    changed[1] += 1  # inside block 0
    other = block_hashes(changed, BS)
    assert len(base) == len(other) == 6
    assert all(a != b for a, b in zip(base, other))
    # A change in block 3 leaves blocks 0..2 alone and changes 3..5.
    changed = list(tokens)
    changed[3 * BS] += 1
    other = block_hashes(changed, BS)
    assert other[:3] == base[:3]
    assert all(a != b for a, b in zip(base[3:], other[3:]))


def test_same_block_under_different_prefixes_differs() -> None:
    block = [5, 6, 7, 8]
    a = block_hashes([1, 2, 3, 4, *block], BS)[1]
    b = block_hashes([1, 2, 3, 9, *block], BS)[1]
    assert a != b
    assert a == hash_block(hash_block(ROOT_PARENT_HASH, [1, 2, 3, 4]), block)


@pytest.mark.parametrize("n", [0, 1, BS - 1, BS, BS + 1, 3 * BS - 1, 3 * BS])
def test_only_full_blocks_are_hashed(n: int) -> None:
    tokens = _tokens(n)
    hashes = block_hashes(tokens, BS)
    assert len(hashes) == n // BS
    # A partial tail does not influence the full blocks' hashes.
    assert block_hashes([*tokens, 1, 2], BS)[: n // BS] == hashes


def test_extra_key_changes_hashes() -> None:
    tokens = _tokens(3 * BS)
    plain = block_hashes(tokens, BS)
    keyed = block_hashes(tokens, BS, extra_key=b"adapter-a")
    other = block_hashes(tokens, BS, extra_key=b"adapter-b")
    assert all(len({p, k, o}) == 3 for p, k, o in zip(plain, keyed, other))
    assert block_hashes(tokens, BS, extra_key=b"adapter-a") == keyed


def test_incremental_equals_one_shot() -> None:
    tokens = _tokens(10 * BS + 3, seed=1)
    full = block_hashes(tokens, BS)
    for start in range(len(full) + 1):
        parent = full[start - 1] if start else ROOT_PARENT_HASH
        assert block_hashes(tokens, BS, start=start, parent_hash=parent) == full[start:]
    # Growing a sequence a few tokens at a time, as the KV manager does.
    grown: list[int] = []
    for end in range(0, len(tokens) + 1, 3):
        parent = grown[-1] if grown else ROOT_PARENT_HASH
        grown += block_hashes(tokens[:end], BS, start=len(grown), parent_hash=parent)
    grown += block_hashes(tokens, BS, start=len(grown), parent_hash=grown[-1])
    assert grown == full


def test_values_fit_in_64_bits() -> None:
    hashes = [h for seed in range(20) for h in block_hashes(_tokens(8 * BS, seed), BS)]
    assert all(isinstance(h, int) and 0 <= h < 2**64 for h in hashes)
    assert len(set(hashes)) == len(hashes)
    # Any 64-bit value is a valid parent (a hash from another machine chains the same way).
    assert 0 <= hash_block(2**64 - 1, [0, 1, 2, 3]) < 2**64


def test_imports_without_torch() -> None:
    out = _run("import sys, kvtransfer.hashing; print('torch' in sys.modules)")
    assert out.strip() == "False"
