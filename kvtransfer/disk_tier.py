"""G3: KV blocks as files on local disk (NVMe), one file per block, surviving restarts.

File layout (little-endian): magic b"BATONKV1", identity (16 bytes: model, weights,
dtype and cache layout, so another model's blocks are never served), block hash (u64),
token count (u32), token ids (u32 each), payload length (u64), xxh3-64 of the payload,
payload. Files are written to a temporary name and renamed, so a reader sees a whole
file or none; a file that fails any check when read (truncated, corrupted, foreign) is
deleted and treated as a miss: the block is recomputed, never served.

Writes happen on a background thread, which also checksums and frames the block (the
engine thread only hands over the payload); until a write lands, the payload stays in
`pending` and is served from there. Reads go into one buffer and are checked in place:
no copies beyond the file read. `read_into` reads a block into a caller's buffer and
touches nothing but the file, so a prefetch thread may call it (kvtransfer.disk_prefetch);
everything else runs on the engine thread. Eviction is LRU over reads and writes within a
budget.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import xxhash

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview  # or any buffer-protocol object (numpy arrays)

MAGIC = b"BATONKV1"
_HEAD = struct.Struct("<8s16sQI")  # magic, identity, block hash, token count
_TAIL = struct.Struct("<QQ")  # payload length, payload checksum


def encode_header(identity: bytes, block_hash: int, tokens: tuple[int, ...],
                  payload: bytes | memoryview) -> bytes:
    """Everything before the payload; the payload follows as is (no copy to join them)."""
    return b"".join((_HEAD.pack(MAGIC, identity, block_hash, len(tokens)),
                     struct.pack(f"<{len(tokens)}I", *tokens),
                     _TAIL.pack(len(payload), xxhash.xxh3_64_intdigest(payload))))


def encode_block(identity: bytes, block_hash: int, tokens: tuple[int, ...],
                 payload: bytes) -> bytes:
    return encode_header(identity, block_hash, tokens, payload) + payload


def _decode_header(data: Buffer, identity: bytes) -> tuple[int, tuple[int, ...], int, int, int]:
    """(block hash, tokens, payload offset, payload length, checksum) of a file's start."""
    if len(data) < _HEAD.size:
        raise ValueError("truncated header")
    magic, ident, block_hash, n = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a Baton KV block")
    if ident != identity:
        raise ValueError("written by another model or cache layout")
    off = _HEAD.size + 4 * n
    if len(data) < off + _TAIL.size:
        raise ValueError("truncated token list")
    tokens = struct.unpack_from(f"<{n}I", data, _HEAD.size)
    size, checksum = _TAIL.unpack_from(data, off)
    return block_hash, tokens, off + _TAIL.size, size, checksum


def decode_block(data: bytes | bytearray, identity: bytes
                 ) -> tuple[int, tuple[int, ...], memoryview]:
    """(block hash, tokens, payload view into `data`); ValueError naming what is wrong."""
    block_hash, tokens, off, size, checksum = _decode_header(data, identity)
    payload = memoryview(data)[off:]
    if len(payload) != size:
        raise ValueError(f"payload is {len(payload)} bytes, header says {size}")
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise ValueError("payload checksum mismatch")
    return block_hash, tokens, payload


class DiskTier:
    def __init__(self, directory: str | Path, identity: bytes, capacity_blocks: int,
                 on_event: Callable[[str, int], None]) -> None:
        self.dir = Path(directory) / identity.hex()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.capacity = capacity_blocks
        self._on_event = on_event
        self._lock = threading.Lock()
        self._index: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # hash -> tokens, LRU
        # Payloads not yet on disk, with the wait that makes them readable (a device copy
        # still in flight). A payload may live in a host-tier slot that stays reserved
        # until its `done` callback runs on the writer thread.
        self.pending: dict[int, tuple[Buffer, Callable[[], None] | None]] = {}
        self._writes: queue.Queue[tuple | None] = queue.Queue()
        self._queued = 0  # puts the writer has not finished with (guarded by _lock)
        self.dropped_bad = 0
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="baton-disk-kv")
        self._writer.start()

    @property
    def backlog(self) -> int:
        """Puts queued or being written: how far the disk is behind."""
        with self._lock:
            return self._queued

    def _path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}.kvb"

    def _scan(self) -> None:
        """Warm restart: index the blocks a previous run left, oldest first."""
        files = sorted(self.dir.glob("*.kvb"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                with path.open("rb") as f:  # headers only: payloads are checked on read
                    magic, ident, block_hash, n = _HEAD.unpack(f.read(_HEAD.size))
                    if magic != MAGIC or ident != self.identity:
                        raise ValueError("foreign file")
                    tokens = struct.unpack(f"<{n}I", f.read(4 * n))
            except (ValueError, struct.error, OSError) as e:
                log.warning("disk KV: dropping %s (%s)", path.name, e)
                path.unlink(missing_ok=True)
                self.dropped_bad += 1
                continue
            self._index[block_hash] = tokens
            self._on_event("stored", block_hash)
        for p in self.dir.glob("*.tmp"):
            p.unlink(missing_ok=True)  # a write cut short by the last shutdown
        self._evict_over_capacity()
        if self._index:
            log.info("disk KV: found %d blocks from an earlier run in %s", len(self._index),
                     self.dir)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    def hashes(self) -> list[int]:
        return list(self._index)

    def tokens(self, block_hash: int) -> tuple[int, ...] | None:
        return self._index.get(block_hash)

    def put(self, block_hash: int, tokens: tuple[int, ...], payload: Buffer,
            ready: Callable[[], None] | None = None,
            done: Callable[[], None] | None = None) -> None:
        """Queue a block for writing. `ready()` (on the writer thread, before reading the
        payload) waits for the payload to be filled; `done()` runs exactly once when the
        payload's memory may be reused, written or not."""
        if block_hash in self._index or self.capacity < 1:
            if done is not None:
                done()
            return
        with self._lock:
            self.pending[block_hash] = (payload, ready)
            self._queued += 1
        self._index[block_hash] = tokens
        self._on_event("stored", block_hash)
        self._writes.put((block_hash, tokens, payload, ready, done))
        self._evict_over_capacity()

    def get(self, block_hash: int) -> Buffer | None:
        """The block's payload, or None (and the file gone) when it fails a check."""
        if block_hash not in self._index:
            return None
        with self._lock:
            entry = self.pending.get(block_hash)
        if entry is not None:
            payload, ready = entry
            if ready is not None:
                ready()
            self._index.move_to_end(block_hash)
            return payload
        try:
            with self._path(block_hash).open("rb", buffering=0) as f:
                data = bytearray(os.fstat(f.fileno()).st_size)  # writable: torch reads it
                f.readinto(data)
            got_hash, tokens, payload = decode_block(data, self.identity)
            if got_hash != block_hash or tokens != self._index[block_hash]:
                raise ValueError("holds another block")
        except (OSError, ValueError) as e:
            self.drop_bad(block_hash, e)
            return None
        self._index.move_to_end(block_hash)
        return payload

    def read_into(self, block_hash: int, out: memoryview) -> tuple[int, ...]:
        """Read the block's file into `out` (exactly its payload) and check it; the token
        ids from its header. Safe on any thread: it touches only the file. OSError when the
        file is gone (evicted), ValueError when it fails a check."""
        with self._path(block_hash).open("rb", buffering=0) as f:
            file_size = os.fstat(f.fileno()).st_size
            head = f.read(min(file_size, _HEAD.size))
            n = _HEAD.unpack_from(head)[3] if len(head) == _HEAD.size else 0
            head += f.read(min(file_size, _HEAD.size + 4 * n + _TAIL.size) - len(head))
            got_hash, tokens, off, size, checksum = _decode_header(head, self.identity)
            if got_hash != block_hash:
                raise ValueError("holds another block")
            if size != len(out) or file_size != off + size:
                raise ValueError(f"payload is {file_size - off} bytes, header says {size}, "
                                 f"expected {len(out)}")
            got = 0
            while got < size and (k := f.readinto(out[got:])):
                got += k
            if got != size:
                raise ValueError("truncated payload")
        if xxhash.xxh3_64_intdigest(out) != checksum:
            raise ValueError("payload checksum mismatch")
        return tokens

    def is_pending(self, block_hash: int) -> bool:
        """Not yet written: `get` serves it from memory, there is no file to read ahead."""
        with self._lock:
            return block_hash in self.pending

    def touch(self, block_hash: int) -> None:
        if block_hash in self._index:
            self._index.move_to_end(block_hash)

    def drop_bad(self, block_hash: int, why: Exception) -> None:
        """A read of the block failed its checks: forget it and delete its file."""
        log.warning("disk KV: block %016x unusable (%s); recomputing it", block_hash, why)
        self.dropped_bad += 1
        self._drop(block_hash)

    def _drop(self, block_hash: int) -> None:
        if self._index.pop(block_hash, None) is not None:
            self._on_event("removed", block_hash)
        with self._lock:
            self.pending.pop(block_hash, None)
        self._path(block_hash).unlink(missing_ok=True)

    def _evict_over_capacity(self) -> None:
        while len(self._index) > self.capacity:
            self._drop(next(iter(self._index)))

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            block_hash, tokens, payload, ready, done = item
            path = self._path(block_hash)
            tmp = path.with_suffix(".tmp")
            try:
                with self._lock:
                    entry = self.pending.get(block_hash)
                if entry is None or entry[0] is not payload:
                    continue  # evicted (or replaced) before it was written
                if ready is not None:
                    ready()
                header = encode_header(self.identity, block_hash, tokens, payload)
                with tmp.open("wb") as f:
                    f.write(header)
                    f.write(payload)
                os.replace(tmp, path)
            except Exception as e:  # the thread must live on: slots wait on `done`
                log.warning("disk KV: cannot write %s (%s)", path, e)
            finally:
                with self._lock:
                    entry = self.pending.get(block_hash)
                    if entry is not None and entry[0] is payload:
                        del self.pending[block_hash]
                if done is not None:
                    done()
                with self._lock:
                    self._queued -= 1
            if block_hash not in self._index:  # evicted while being written
                path.unlink(missing_ok=True)

    def flush(self) -> None:
        """Wait until the writer has finished every queued put (tests, shutdown)."""
        done = threading.Event()
        while True:
            with self._lock:
                if not self._queued:
                    break
            done.wait(0.01)

    def close(self) -> None:
        self.flush()
        self._writes.put(None)
        self._writer.join(timeout=5)
