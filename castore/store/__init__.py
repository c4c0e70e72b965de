"""Chunk storage: the BlobStore seam, and the key-value transaction seam the namespace uses.

Implementations: LmdbStore (store/lmdb.py, the only module that imports lmdb) and MemoryStore
(store/memory.py). One contract suite (tests/test_blobstore_contract.py) runs against each.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from castore.ids import ChunkId


@dataclass(frozen=True, slots=True)
class StoredChunk:
    """A chunk as kept on disk and sent between peers: codec tag, raw length, stored bytes."""

    codec: int
    raw_len: int
    data: bytes


class BlobStore(Protocol):
    """Content-addressed chunk storage. Keys are ChunkIds; values are immutable bytes.

    put() checks ChunkId.of(data) == cid and raises IntegrityError otherwise, so a store never
    holds bytes that do not hash to their key; put is idempotent (True only if newly stored).
    get() re-verifies the bytes on every read and raises IntegrityError naming the chunk if they
    do not match; it raises ChunkNotFoundError if absent and never returns None.
    delete() of a missing chunk is not an error. ids() is sorted and resumable after a given id.
    All methods are thread-safe.
    """

    def has(self, cid: ChunkId) -> bool: ...
    def get(self, cid: ChunkId) -> bytes: ...
    def put(self, cid: ChunkId, data: bytes | memoryview) -> bool: ...
    def delete(self, cid: ChunkId) -> None: ...
    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]: ...
    def get_stored(self, cid: ChunkId) -> StoredChunk: ...
    def put_stored(self, cid: ChunkId, chunk: StoredChunk) -> bool: ...


class KvTxn(Protocol):
    """One transaction over named sub-databases of sorted byte keys (LMDB or in memory).

    Buffers returned by get/scan are valid only inside the transaction. `cache` is a scratch
    dict that lives as long as the transaction; `before_commit` hooks run just before commit
    and `after_commit` hooks once it is durable (a write function may run more than once, each
    time with a fresh transaction, so hooks are registered per transaction).
    """

    cache: dict[str, object]
    before_commit: list[Callable[[], None]]
    after_commit: list[Callable[[], None]]

    def get(self, db: str, key: bytes) -> bytes | None: ...
    def put(self, db: str, key: bytes, value: bytes | memoryview, overwrite: bool = True) -> bool: ...
    def delete(self, db: str, key: bytes) -> bool: ...
    def scan(self, db: str, prefix: bytes = b"", start: bytes | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]: ...


from castore.store.memory import MemoryKv, MemoryStore  # noqa: E402

__all__ = ["BlobStore", "KvTxn", "MemoryKv", "MemoryStore", "StoredChunk"]
