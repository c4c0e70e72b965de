"""Chunks for open files, from the repo's store: each verified on its first read (BLAKE3);
uncompressed ones are then copied straight out of the store's map on every read.
Imports no FUSE code.
"""
from __future__ import annotations

import os
from collections.abc import Callable

from castore import codec
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

    def cache_dropper(self) -> Callable[[], None]:
        """A function that, each time it is called, asks the kernel to drop from its page
        cache the pages the store's file gained since the previous call (the first call:
        since this one). A file being written streams its chunks into the store in durable
        batches: their pages in the cache are clean once committed, and freed at once they
        are reused by the next batch's writes, which on this kind of virtual machine is
        several times faster than filling pages the host has to provide anew. Reads of
        those chunks then come from disk; re-reads through the mount are served from the
        drive's own page cache. Only a hint: nothing here changes what is stored."""
        env = self._store.env
        path = env.path / "data.mdb"

        def end() -> int:
            info = env.env.info()
            return (int(info["last_pgno"]) + 1) * int(env.env.stat()["psize"])

        mark = [end()]

        def drop() -> None:
            try:
                now = end()
                if now > mark[0]:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        os.posix_fadvise(fd, mark[0], now - mark[0], os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
                    mark[0] = now
            except (OSError, AttributeError):   # a hint: a failure changes nothing
                pass
        return drop

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
