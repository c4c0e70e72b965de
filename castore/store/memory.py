"""In-memory BlobStore and KvTxn: first-class, for tests, simulations and ephemeral use."""
from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from castore import codec
from castore.errors import ChunkNotFoundError, IntegrityError
from castore.ids import ChunkId

if TYPE_CHECKING:
    from castore.store import BlobStore, StoredChunk

T = TypeVar("T")


def verify(cid: ChunkId, data: bytes | memoryview) -> None:
    """Raise IntegrityError unless data hashes to cid."""
    if ChunkId.of(data) != cid:
        raise IntegrityError(f"chunk {cid} is corrupt: its bytes hash to {ChunkId.of(data).short}")


class MemoryStore:
    """A dict of chunks, with the same contract as LmdbStore (compression included)."""

    def __init__(self, level: int = codec.DEFAULT_LEVEL) -> None:
        self._chunks: dict[ChunkId, tuple[int, int, bytes]] = {}
        self._level = level
        self._mutex = threading.Lock()

    def has(self, cid: ChunkId) -> bool:
        return cid in self._chunks

    def get(self, cid: ChunkId) -> bytes:
        try:
            tag, raw_len, stored = self._chunks[cid]
        except KeyError:
            raise ChunkNotFoundError(f"no chunk {cid}") from None
        data = bytes(codec.decode(tag, stored, raw_len))
        verify(cid, data)
        return data

    def put(self, cid: ChunkId, data: bytes | memoryview) -> bool:
        verify(cid, data)
        if cid in self._chunks:
            return False
        tag, stored = codec.encode(data, self._level)
        with self._mutex:
            if cid in self._chunks:
                return False
            self._chunks[cid] = (tag, len(data), bytes(stored))
            return True

    def delete(self, cid: ChunkId) -> None:
        with self._mutex:
            self._chunks.pop(cid, None)

    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]:
        for cid in sorted(self._chunks):
            if after is None or cid > after:
                yield cid

    def get_stored(self, cid: ChunkId) -> StoredChunk:
        from castore.store import StoredChunk
        try:
            tag, raw_len, stored = self._chunks[cid]
        except KeyError:
            raise ChunkNotFoundError(f"no chunk {cid}") from None
        return StoredChunk(tag, raw_len, stored)

    def put_stored(self, cid: ChunkId, chunk: StoredChunk) -> bool:
        raw = codec.decode(chunk.codec, chunk.data, chunk.raw_len)
        verify(cid, raw)
        with self._mutex:
            if cid in self._chunks:
                return False
            self._chunks[cid] = (chunk.codec, chunk.raw_len, bytes(chunk.data))
            return True

    def corrupt(self, cid: ChunkId) -> None:
        """Flip a byte of a stored chunk (for tests of the read-side check)."""
        tag, raw_len, stored = self._chunks[cid]
        flipped = bytes([stored[0] ^ 0xFF]) + stored[1:]
        self._chunks[cid] = (tag, raw_len, flipped)


class _MemoryTxn:
    """Writes go to an overlay, applied only when the transaction function returns."""

    def __init__(self, kv: MemoryKv) -> None:
        self._kv = kv
        self.overlay: dict[tuple[str, bytes], bytes | None] = {}
        self.cache: dict[str, object] = {}
        self.before_commit: list[Callable[[], None]] = []
        self.after_commit: list[Callable[[], None]] = []

    def get(self, db: str, key: bytes) -> bytes | None:
        key = bytes(key)
        if (db, key) in self.overlay:
            return self.overlay[(db, key)]
        return self._kv.dbs.get(db, {}).get(key)

    def put(self, db: str, key: bytes, value: bytes | memoryview, overwrite: bool = True) -> bool:
        if not overwrite and self.get(db, key) is not None:
            return False
        self.overlay[(db, bytes(key))] = bytes(value)
        return True

    def delete(self, db: str, key: bytes) -> bool:
        existed = self.get(db, key) is not None
        self.overlay[(db, bytes(key))] = None
        return existed

    def scan(self, db: str, prefix: bytes = b"", start: bytes | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        keys = set(self._kv.dbs.get(db, {})) | {k for d, k in self.overlay if d == db}
        picked = sorted(k for k in keys if k.startswith(prefix))
        if reverse:
            picked = [k for k in reversed(picked) if start is None or k <= start]
        else:
            picked = picked[bisect.bisect_left(picked, start):] if start else picked
        for k in picked:
            v = self.get(db, k)
            if v is not None:
                yield k, v


class MemoryKv:
    """Named tables of sorted byte keys in memory; transactions run one at a time and are
    atomic: an exception leaves the tables as they were."""

    def __init__(self) -> None:
        self.dbs: dict[str, dict[bytes, bytes]] = {}
        self._mutex = threading.RLock()

    def write(self, fn: Callable[[_MemoryTxn], T]) -> T:
        with self._mutex:
            txn = _MemoryTxn(self)
            result = fn(txn)
            for hook in txn.before_commit:
                hook()
            for (db, key), value in txn.overlay.items():
                table = self.dbs.setdefault(db, {})
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            for hook in txn.after_commit:
                hook()
            return result

    read = write


if TYPE_CHECKING:
    _: type[BlobStore] = MemoryStore
