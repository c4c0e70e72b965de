"""Reading one file version: bisect to the chunk (Manifest.locate), keep the chunks around the
read position ready, and verify the next ones on a thread pool while a reader moves forward, so
a sequential read never waits for a chunk it could have had and its speed does not depend on the
offset.

A chunk stored uncompressed is verified once (BLAKE3 over the store's map) and then copied
straight from the map into the reader's buffer on each read: one copy, and no chunk bytes held
in memory here. A compressed chunk is decompressed and verified once and kept while it is near
the read position. Imports no FUSE code and no LMDB: chunks come through a ChunkSource.
"""
from __future__ import annotations

import threading
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol

from castore.errors import DeadlineError
from castore.files import Manifest
from castore.ids import ChunkId

PREFETCH_BYTES = 8 << 20        # bytes of chunks made ready ahead of a sequential reader
PREFETCH_MAX = 8                # chunks ahead at most
READ_TIMEOUT = 60.0             # seconds a read waits for a chunk being fetched


class ChunkSource(Protocol):
    """Where chunk bytes come from (the vfs, over the store). Thread-safe."""

    def probe(self, cid: ChunkId, readahead: object) -> bytes | None:
        """Verify a chunk. None if it is stored uncompressed (read it with copy()); else its
        decompressed, verified bytes. Raises IntegrityError, ChunkNotFoundError."""

    def copy(self, cid: ChunkId, offset: int, dest: memoryview, readahead: object
             ) -> int | None:
        """Copy bytes of an uncompressed chunk into dest; None if it is not stored so."""

    def fill(self, cid: ChunkId, offset: int, dest: memoryview) -> None:
        """Verify a chunk and copy len(dest) of its bytes from offset into dest, in one
        step, keeping nothing. Raises IntegrityError, ChunkNotFoundError."""


class Budget:
    """Bytes of decompressed chunks held by every reader together, capped: a reader only reads
    ahead while the total is under the cap, so many open files cannot exhaust memory."""

    def __init__(self, cap: int = 256 << 20) -> None:
        self.cap = cap
        self.used = 0
        self._mutex = threading.Lock()

    def take(self, n: int) -> bool:
        with self._mutex:
            if self.used + n > self.cap:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._mutex:
            self.used = max(0, self.used - n)


_RAW = b""          # a probe result: verified, stored uncompressed, read from the store


class ChunkReader:
    """The bytes of one manifest. Thread-safe: several readers of one open file may read at
    once (the kernel reads ahead in parallel). Integrity and missing-chunk errors come through
    unchanged. close() drops what is kept."""

    def __init__(self, manifest: Manifest, source: ChunkSource, pool: Executor,
                 budget: Budget, readahead: object = None) -> None:
        self.manifest = manifest
        self._source = source
        self._pool = pool
        self._budget = budget
        self._readahead = readahead
        self._mutex = threading.Lock()      # guards the dicts below; never held during I/O
        self._chunks: dict[int, Future[bytes]] = {}
        self._charged: dict[int, int] = {}  # decompressed chunks counted in the budget
        self._last = -1
        self._closed = False

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            self._chunks.clear()
            for n in self._charged.values():
                self._budget.give(n)
            self._charged.clear()

    def _ahead(self, i: int) -> object:
        """The readahead for a read of chunk i: none for the file's last chunk."""
        return self._readahead if i + 1 < len(self.manifest.chunks) else None

    def _probe(self, i: int) -> bytes:
        data = self._source.probe(self.manifest.chunks[i], self._ahead(i))
        if data is None:
            return _RAW
        with self._mutex:
            if not self._closed and self._budget.take(len(data)):
                self._charged[i] = self._charged.get(i, 0) + len(data)
        return data

    def _chunk(self, i: int) -> bytes:
        """Chunk i probed (in this thread unless already done or on its way)."""
        with self._mutex:
            fut = self._chunks.get(i)
            mine = fut is None
            if mine:
                fut = self._chunks[i] = Future()
                fut.set_running_or_notify_cancel()
        assert fut is not None
        if mine:
            try:
                fut.set_result(self._probe(i))
            except BaseException as exc:
                fut.set_exception(exc)
                self._forget(i, fut)
                raise
        try:
            return fut.result(timeout=READ_TIMEOUT)
        except FutureTimeout:
            raise DeadlineError(f"chunk {self.manifest.chunks[i]} did not arrive within "
                                f"{READ_TIMEOUT:.0f} s") from None
        except BaseException:
            self._forget(i, fut)
            raise

    def _forget(self, i: int, fut: Future[bytes]) -> None:
        with self._mutex:
            if self._chunks.get(i) is fut:
                del self._chunks[i]
                self._budget.give(self._charged.pop(i, 0))

    def _after_read(self, i: int) -> None:
        """Keep the window [i - 1, i + ahead]; start verifying ahead when moving forward."""
        m = self.manifest
        with self._mutex:
            if self._closed:
                return
            forward = i >= self._last
            self._last = i
            for j in [j for j in self._chunks if j < i - 1 or j > i + PREFETCH_MAX]:
                del self._chunks[j]
                self._budget.give(self._charged.pop(j, 0))
            if not forward:
                return
            ahead = 0
            j = i + 1
            while j < len(m.chunks) and j <= i + PREFETCH_MAX and ahead < PREFETCH_BYTES:
                ahead += m.lengths[j]
                if j not in self._chunks:
                    if self._budget.used + m.lengths[j] > self._budget.cap:
                        break
                    self._chunks[j] = self._pool.submit(self._probe, j)
                j += 1

    def read_once(self, offset: int, dest: memoryview) -> int:
        """read_into for bytes read only once (read_once below)."""
        return read_once(self.manifest, self._source, offset, dest)

    def read_into(self, offset: int, dest: memoryview) -> int:
        """Copy the bytes at offset into dest; returns how many (short only at the end)."""
        m = self.manifest
        want = min(len(dest), m.size - offset)
        if want <= 0:
            return 0
        done = 0
        i = m.locate(offset)
        while done < want:
            data = self._chunk(i)
            start = offset + done - m.offsets[i]
            n = min(want - done, m.lengths[i] - start)
            piece = dest[done:done + n]
            if data is _RAW:
                got = self._source.copy(m.chunks[i], start, piece, self._ahead(i))
                if got is None:             # re-stored compressed meanwhile: probe again
                    self._forget(i, self._chunks.get(i) or Future())
                    continue
                n = got
            else:
                piece[:] = memoryview(data)[start:start + n]
            done += n
            self._after_read(i)
            i += 1
        return done


def read_once(m: Manifest, source: ChunkSource, offset: int, dest: memoryview) -> int:
    """Copy the bytes of m at offset into dest for a reader that reads them only once (a
    small file handed whole to the kernel): each chunk verified and copied in one step,
    nothing kept, nothing read ahead. Returns how many (short only at the end)."""
    end = min(offset + len(dest), m.size)
    if end <= offset:
        return 0
    for i in range(m.locate(offset), m.locate(end - 1) + 1):
        lo, hi = max(offset, m.offsets[i]), min(end, m.offsets[i] + m.lengths[i])
        source.fill(m.chunks[i], lo - m.offsets[i], dest[lo - offset:hi - offset])
    return end - offset
