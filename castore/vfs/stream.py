"""Chunking a file while it is written: when a file grows by appends, a background thread reads
the new bytes back from the staging file into a reused window, cuts them with the same
content-defined chunker as everything else (a chunk's end depends only on its own bytes, so
cutting window by window and keeping the last, unfinished chunk for the next gives the cuts of
the whole file), and stores the chunks through a ChunkPipeline (hashed and compressed on a pool,
committed in batches, each durable but unreferenced until the file's own commit). Closing a
large file then only has its last few MiB left to do, and memory stays bounded: the bytes
live in the staging file, not here, and the owner frees them there once durable() reports
their chunks stored.

Imports no FUSE code and no LMDB.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from castore import chunking
from castore.files import ChunkPipeline, Manifest, Prepared
from castore.ids import ChunkId
from castore.vfs.readcache import DeadlineError

log = logging.getLogger(__name__)

WINDOW = 16 << 20           # bytes of the file held for cutting at a time (> MAX_SIZE)
STEP = chunking.MAX_SIZE    # new bytes a step waits for (unless the stream ends or is limited)
LAG_MAX = 64 << 20          # bytes a writer may run ahead of the chunker before it waits
LAG_WAIT = 10.0             # seconds a write waits for the chunker at most (then goes on)
TAKE_TIMEOUT = 120.0        # seconds a commit waits for the chunker to finish


class StreamWriter:
    """Chunks the bytes [origin, end) of a file as end advances.

    advance(end): bytes before end are written and final (unless limit() says otherwise).
    limit(offset): bytes from offset on may still change; chunking stops there for good.
    durable(start): the chunks from index start on whose commit is durable, in file order.
    take(end): stop, and return the stored chunks that cover [origin, origin + their sum),
    all of [origin, end) when nothing was limited. close(): stop and forget.
    Thread-safe; one writer thread and the owner's commit may call it at once.
    """

    def __init__(self, origin: int, read_into: Callable[[int, memoryview], int],
                 pipeline: ChunkPipeline) -> None:
        self.origin = origin
        self._read_into = read_into
        self._pipeline = pipeline
        self._cond = threading.Condition()
        self._end = origin          # bytes known final
        self._limit: int | None = None
        self._fed = origin          # bytes read back and fed to the chunker
        self._final = False
        self._stop = False
        self._result: Manifest | None = None
        self._error: BaseException | None = None
        self._durable_ids: list[ChunkId] = []
        self._durable_lengths: list[int] = []
        self._thread = threading.Thread(target=self._run, name="castore-vfs-stream",
                                        daemon=True)
        self._thread.start()

    @property
    def broken(self) -> bool:
        return self._limit is not None or self._error is not None

    def advance(self, end: int) -> None:
        with self._cond:
            if end > self._end:
                self._end = end
                self._cond.notify_all()
            if self._error is None and self._limit is None and end - self._fed > LAG_MAX:
                deadline = time.monotonic() + LAG_WAIT
                while end - self._fed > LAG_MAX // 2 and not self._stop and \
                        self._error is None and self._thread.is_alive():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(min(left, 0.5))

    def limit(self, offset: int) -> None:
        with self._cond:
            self._limit = offset if self._limit is None else min(self._limit, offset)
            self._cond.notify_all()

    def _chunks(self) -> Iterator[bytes]:
        cutter = Cutter(self._read_into, self.origin)
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    hi = self._end if self._limit is None else min(self._end, self._limit)
                    # each step cuts the window's unconsumed tail again (its last chunk may
                    # still grow), so wait for at least a chunk's worth of new bytes
                    if self._fed < hi and (hi - self._fed >= STEP or
                                           self._limit is not None) or \
                            (self._final and self._limit is None):
                        break
                    if self._limit is not None and self._fed >= self._limit:
                        return              # nothing more can be kept
                    self._cond.wait(1.0)
                finishing = self._final and self._limit is None
            chunks = cutter.step(hi, final=finishing)
            with self._cond:
                self._fed = cutter.read_end
                self._cond.notify_all()
            yield from chunks
            if finishing and cutter.read_end >= hi and cutter.done:
                return

    def durable(self, start: int) -> tuple[list[ChunkId], list[int]]:
        with self._cond:
            return self._durable_ids[start:], self._durable_lengths[start:]

    def _on_durable(self, batch: list[Prepared]) -> None:
        with self._cond:
            self._durable_ids += [p.cid for p in batch]
            self._durable_lengths += [p.raw_len for p in batch]

    def _run(self) -> None:
        try:
            self._result, _ = self._pipeline.store_chunks(self._chunks(),
                                                          on_durable=self._on_durable)
        except BaseException as exc:    # reported to take(); the commit falls back
            log.warning("background chunking of a file being written failed: %s", exc)
            self._error = exc
        finally:
            with self._cond:
                self._cond.notify_all()

    def take(self, end: int) -> tuple[list[ChunkId], list[int]]:
        """Wait for the chunker and return the chunks that are final and stored. Raises
        DeadlineError if it does not finish within TAKE_TIMEOUT."""
        with self._cond:
            if self._limit is None and end >= self._end:
                self._end = end
                self._final = True
            else:
                self.limit(end)
                self._stop = True
            self._cond.notify_all()
        self._thread.join(TAKE_TIMEOUT)
        if self._thread.is_alive():
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join(5.0)
            raise DeadlineError("chunking a file being written did not finish in time")
        if self._error is not None or self._result is None:
            return [], []
        keep = (end if self._limit is None else min(end, self._limit)) - self.origin
        ids: list[ChunkId] = []
        lengths: list[int] = []
        total = 0
        for cid, n in zip(self._result.chunks, self._result.lengths):
            if total + n > keep:
                break
            ids.append(cid)
            lengths.append(n)
            total += n
        return ids, lengths

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(TAKE_TIMEOUT)


class Cutter:
    """Content-defined chunks of a byte range read piece by piece through read_into(offset,
    dest) -> count, in a reused window: each step reads what fits, and returns every chunk
    that is final (all of them once final=True and the range is read)."""

    def __init__(self, read_into: Callable[[int, memoryview], int], start: int,
                 window: int = WINDOW) -> None:
        self._read_into = read_into
        self._buf = bytearray(window)
        self._view = memoryview(self._buf)
        self._base = start            # file offset of the window's first byte
        self._filled = 0
        self.done = False

    @property
    def read_end(self) -> int:
        return self._base + self._filled

    def step(self, hi: int, final: bool) -> list[bytes]:
        want = min(hi - self.read_end, len(self._buf) - self._filled)
        if want > 0:
            got = self._read_into(self.read_end, self._view[self._filled:self._filled + want])
            if got <= 0:
                raise OSError(f"the staging file ended at {self.read_end} of {hi} bytes")
            self._filled += got
        last = final and self.read_end >= hi
        spans = list(chunking.cut(self._view[:self._filled]))
        if not last and spans:
            spans = spans[:-1]              # may still grow: its end is not known yet
        out = [bytes(self._view[o:o + n]) for o, n in spans]
        used = sum(n for _, n in spans)
        if used:
            rest = self._filled - used
            self._view[:rest] = self._view[used:self._filled]
            self._base += used
            self._filled = rest
        if last:
            self.done = True
        return out

    def all(self, hi: int) -> Iterator[bytes]:
        """Every chunk of [start, hi)."""
        while not self.done:
            yield from self.step(hi, final=True)
