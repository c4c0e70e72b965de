"""Chunks for open files, from the repo's store: each verified on its first read (BLAKE3);
uncompressed ones are then copied straight out of the store's map on every read.
Imports no FUSE code.
"""
from __future__ import annotations

from collections.abc import Callable

from castore import codec
from castore.errors import IntegrityError
from castore.files import Manifest
from castore.ids import ChunkId
from castore.store.lmdb import LmdbStore, LmdbTxn
from castore.store.memory import verify
from castore.store.readahead import Readahead


class StoreSource:
    """The ChunkSource of open files: chunks from the repo's store, each verified on its
    first read (BLAKE3), uncompressed ones copied straight out of the store's map."""

    def __init__(self, store: LmdbStore,
                 read: Callable[[Callable[[LmdbTxn], object], ChunkId], object]) -> None:
        self._store = store
        self._read = read          # runs a read txn (in cluster mode fetching a missing chunk)

    def probe(self, cid: ChunkId, readahead: object) -> bytes | None:
        ra = readahead if isinstance(readahead, Readahead) else None

        def run(t: LmdbTxn) -> bytes | None:
            tag, raw_len, view = self._store.view_in(t, cid, ra)
            if tag == codec.RAW:
                verify(cid, view)
                return None
            data = codec.decode(tag, view, raw_len)
            verify(cid, data)
            return bytes(data)
        return self._read(run, cid)  # type: ignore[return-value]

    def copy(self, cid: ChunkId, offset: int, dest: memoryview, readahead: object
             ) -> int | None:
        ra = readahead if isinstance(readahead, Readahead) else None

        def run(t: LmdbTxn) -> int | None:
            tag, raw_len, view = self._store.view_in(t, cid, ra)
            if tag != codec.RAW:
                return None
            n = max(0, min(len(dest), raw_len - offset))
            dest[:n] = view[offset:offset + n]
            return n
        return self._read(run, cid)  # type: ignore[return-value]

    def whole_in(self, txn: LmdbTxn, m: Manifest) -> bytes | bytearray:
        """All of m's bytes, each chunk verified, read in txn: ChunkNotFoundError for a chunk
        not held here (fill fetches it). A file of one chunk comes as the chunk's bytes."""
        if len(m.chunks) == 1:
            tag, raw_len, view = self._store.view_in(txn, m.chunks[0])
            data = view if tag == codec.RAW else codec.decode(tag, view, raw_len)
            verify(m.chunks[0], data)
            if len(data) != m.size:
                raise IntegrityError(f"chunk {m.chunks[0]} is not as long as its file says")
            return bytes(data) if isinstance(data, memoryview) else data
        buf = bytearray(m.size)
        dest = memoryview(buf)
        for cid, offset, n in zip(m.chunks, m.offsets, m.lengths):
            tag, raw_len, view = self._store.view_in(txn, cid)
            data = view if tag == codec.RAW else codec.decode(tag, view, raw_len)
            verify(cid, data)
            if len(data) < n:
                raise IntegrityError(f"chunk {cid} is shorter than its file says")
            dest[offset:offset + n] = memoryview(data)[:n]
        return buf

    def fill(self, cid: ChunkId, offset: int, dest: memoryview) -> None:
        def run(t: LmdbTxn) -> None:
            tag, raw_len, view = self._store.view_in(t, cid)
            data = view if tag == codec.RAW else codec.decode(tag, view, raw_len)
            verify(cid, data)
            if len(data) < offset + len(dest):
                raise IntegrityError(f"chunk {cid} is shorter than its file says")
            dest[:] = memoryview(data)[offset:offset + len(dest)]
        self._read(run, cid)
