"""The state of one file open on this peer, shared by all its descriptors: what a read sees and
what a close commits.

The content is the committed version the file was opened at (the base, read chunk by chunk
through a ChunkReader), overlaid with what was written since, kept in a sparse staging file.
Below `base_limit` the staging file holds only the 64 KiB blocks that were written (a partly
written block is first filled from the base); from base_limit on, staging holds everything.
Appends are chunked while they arrive (StreamWriter), and each batch of chunks it has stored
durably becomes part of the base: base_limit moves past it and its bytes are freed in the
staging file, whose blocks take the next bytes written. A large sequential write thus keeps
only its last few tens of MiB in staging, in the same cached pages throughout, which here is
several times faster than filling new ones; its bytes in the base read without the lock
(_final). build() turns the content into a manifest for
the commit, reusing every base chunk before the first change, so a small edit of a big file
stores only the chunks it touched.

Imports no FUSE code and no LMDB; the vfs supplies chunk loading and storing.
"""
from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from castore import chunking
from castore.files import EMPTY, ChunkPipeline, Manifest, Prepared, prepare
from castore.ids import ChunkId, NodeId
from castore.ops import Attrs
from castore.vfs.readcache import Budget, ChunkReader, ChunkSource, DeadlineError
from castore.vfs.staging import Staging
from castore.vfs.stream import Cutter, StreamWriter

if TYPE_CHECKING:
    from castore.vfs.committer import AttrChange

BLOCK = 64 << 10            # granularity of the written-blocks map below base_limit
STREAM_FROM = 16 << 20      # bytes appended before chunking starts in the background
SMALL_COMMIT = 4 << 20      # content up to this size is chunked inside the commit itself
PAGE = mmap.PAGESIZE        # the kernel's page cache granularity


class Held:
    """A lock already acquired, released at the end of a with block (the open-file and
    registry locks are taken several times per request: cheaper than a generator-based
    context manager)."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class Landing(Protocol):
    """A close on its way to the store (castore.vfs.committer.Landing)."""

    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass
class FileServices:
    """What open files need from the vfs."""

    source: ChunkSource
    read_pool: Executor
    budget: Budget
    staging_dir: Path
    pipeline: Callable[[], ChunkPipeline]
    readahead: Callable[[int], object]     # a file's size -> its Readahead
    lock_timeout: float = 30.0


@dataclass
class Built:
    """A file's content ready to commit: the manifest, and chunks to store with it."""

    manifest: Manifest
    prepared: list[Prepared] = field(default_factory=list)


class OpenFile:
    """Shared open state of one file. Every method is thread-safe (one lock, taken with a
    timeout: DeadlineError rather than a hang)."""

    def __init__(self, svc: FileServices, node: NodeId | None, base: Manifest,
                 base_key: bytes | None, base_ref: bytes, mode: int, mtime_ns: int,
                 attrs: Attrs | None = None, parent: NodeId | None = None,
                 name: bytes = b"") -> None:
        self.svc = svc
        self.node = node                    # None: created here, not committed yet
        self.parent = parent                # where a pending create goes
        self.name = name
        self.handles = 0
        self.unlinked = False
        self.mode = mode
        self.mtime_ns = mtime_ns
        self.attrs: Attrs = dict(attrs or {})   # for a pending create: xattrs, owner
        self._lock = threading.Lock()
        self._set_base(base, base_key, base_ref)
        self.size = base.size
        self.dirty = node is None           # a new file is committed even if never written
        # set while a close of this file waits for its group commit (castore.vfs.committer):
        # its content is fixed until then, so writes wait for it
        self.inflight: Landing | None = None
        # Whether the kernel's copy of the writes has gaps: it keeps the pages that single
        # writes filled whole, so a write that starts inside a page, or follows one that
        # ended inside a page, leaves one it will read back (see Vfs: keep_cache).
        self.ragged = False
        self.around = False                 # written through a handle around the page cache
        self._mid_page = False
        self.read_started = False           # counted as a first read (VfsCore._first_read)
        # attribute changes journaled by name while the file's create was landing: given
        # its node when it lands (FileHandleOps._landed)
        self.attrs_ahead: list[AttrChange] = []

    # -- state ----------------------------------------------------------------------------
    def _set_base(self, base: Manifest, key: bytes | None, ref: bytes) -> None:
        # base: the content below base_limit (the version opened, or since a stream took
        # appended chunks into it, that version plus those chunks); key and ref name the
        # committed version it started from
        # _final: (reader, limit) while the bytes below limit are the base's, unchanged
        # by writes; read without the lock. Cleared before anything that changes them.
        self._final: tuple[ChunkReader, int] | None = None
        self.base = base
        self.base_key = key
        self.base_ref = ref
        self.base_limit = base.size
        self.staged: set[int] = set()
        self.staging: Staging | None = None
        self.stream: StreamWriter | None = None
        self.reader = ChunkReader(base, self.svc.source, self.svc.read_pool, self.svc.budget,
                                  self.svc.readahead(base.size))
        self._seq_end: int | None = base.size     # appends from here on can be streamed
        self._written_end = base.size
        self._absorbed = 0                  # chunks of the stream taken into base
        self._absorbed_end = 0              # where the next one starts

    def locked(self) -> Held:
        """The file's lock, for a with block (DeadlineError after lock_timeout)."""
        if not self._lock.acquire(timeout=self.svc.lock_timeout):
            raise DeadlineError(f"an open file stayed busy for {self.svc.lock_timeout:.0f} s")
        return Held(self._lock)

    def settled(self) -> Held:
        """locked(), once no close of this file is waiting for its commit."""
        deadline = time.monotonic() + self.svc.lock_timeout
        while True:
            pending = self.inflight
            if pending is not None and not pending.wait(max(0.0, deadline -
                                                            time.monotonic())):
                raise DeadlineError("a closed file was not committed in time")
            held = self.locked()
            if self.inflight is None:
                return held
            self._lock.release()

    def _staging(self) -> Staging:
        if self.staging is None:
            self.staging = Staging(self.svc.staging_dir)
            self.staging.truncate(self.size)
        return self.staging

    def close(self) -> None:
        """Drop staging and caches (after the last handle is released)."""
        with self.locked():
            self._drop_staging()
            self.reader.close()

    def _drop_staging(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.staging is not None:
            self.staging.close()
            self.staging = None

    # -- reading --------------------------------------------------------------------------
    def read_into(self, offset: int, dest: memoryview) -> int:
        """Copy the bytes at offset into dest; returns how many (short only at the end)."""
        if not self.dirty:
            reader = self.reader             # a commit may swap it; either one is right
            return reader.read_into(offset, dest[:max(0, min(len(dest), self.size - offset))])
        # Bytes the stream already took into the base are final: they are read without the
        # lock, which a commit holds while it finishes the stream (a file read right after
        # it was written would wait for its whole commit)
        final = self._final
        if final is not None and offset + len(dest) <= final[1]:
            return final[0].read_into(offset, dest)
        with self.locked():
            return self._read_merged(offset, dest)

    def read_once(self, offset: int, dest: memoryview) -> int:
        """read_into for a clean file's bytes read only once (ChunkReader.read_once); 0 if
        the file has unsaved writes."""
        if self.dirty:
            return 0
        return self.reader.read_once(offset, dest[:max(0, min(len(dest), self.size - offset))])

    def _read_merged(self, offset: int, dest: memoryview) -> int:
        n = min(len(dest), self.size - offset)
        if n <= 0:
            return 0
        pos, end = offset, offset + n
        limit = self.base_limit
        while pos < end:
            b = pos // BLOCK
            from_base = pos < limit and b not in self.staged
            stop = min(end, limit) if pos < limit else end
            if pos < limit:
                b += 1
                while b * BLOCK < stop and ((b not in self.staged) == from_base):
                    b += 1
                stop = min(stop, b * BLOCK)
            piece = dest[pos - offset:stop - offset]
            if from_base:
                got = self.reader.read_into(pos, piece)
                if got < len(piece):
                    piece[got:] = bytes(len(piece) - got)
            else:
                self._staging().pread_into(piece, pos)
            pos = stop
        return n

    # -- writing --------------------------------------------------------------------------
    def write(self, offset: int | None, data: bytes | memoryview) -> int:
        """Write data at offset (None: at the end, for O_APPEND). data is only read during
        the call. Returns the number of bytes written."""
        with self.settled():
            if offset is None:
                offset = self.size
            n = len(data)
            end = offset + n
            staging = self._staging()
            if offset < self.base_limit:
                self._final = None
                self._fill_blocks(offset, min(end, self.base_limit))
            staging.pwrite(data, offset)
            if offset % PAGE or self._mid_page:
                self.ragged = True
            self._mid_page = bool(end % PAGE)
            self._note_write(offset, end)
            self.size = max(self.size, end)
            self.dirty = True
            self.mtime_ns = time.time_ns()
            if self.stream is not None:
                self._absorb(*self.stream.durable(self._absorbed))
            return n

    def _fill_blocks(self, lo: int, hi: int) -> None:
        """Before writing [lo, hi) below base_limit: blocks it only partly covers get their
        base bytes first, so staging holds whole blocks."""
        assert self.staging is not None
        for b in range(lo // BLOCK, (hi - 1) // BLOCK + 1):
            if b in self.staged:
                continue
            start, stop = b * BLOCK, min((b + 1) * BLOCK, self.base_limit)
            if not (lo <= start and hi >= stop):
                buf = bytearray(stop - start)
                got = self.reader.read_into(start, memoryview(buf))
                self.staging.pwrite(memoryview(buf)[:got], start)
            self.staged.add(b)

    def _note_write(self, offset: int, end: int) -> None:
        seq = self._seq_end
        if seq is not None and offset == seq and self._written_end <= seq and \
                self.base_limit in (0, self.base.size) and not self.staged:
            self._seq_end = end
            if self.stream is not None:
                self.stream.advance(end)
            elif end - self.base_limit >= STREAM_FROM and self.staging is not None and \
                    self.staging.spilled:
                self.stream = StreamWriter(self.base_limit, self._stream_read,
                                           self.svc.pipeline())
                self._absorbed, self._absorbed_end = 0, self.base_limit
                self.stream.advance(end)
        elif seq is not None:
            self._seq_end = None
            self._end_stream(min(offset, seq))
        self._written_end = max(self._written_end, end)

    def _end_stream(self, end: int) -> None:
        """Stop the stream (the content from end on is not final, or the file is being
        committed) and take into the base the chunks it stored before end. Lock held."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        try:
            ids, lengths = stream.take(end)
        except DeadlineError:       # staging still holds every byte from base_limit on
            return
        self._absorb(ids[self._absorbed:], lengths[self._absorbed:])

    def _absorb(self, ids: list[ChunkId], lengths: list[int]) -> None:
        """Stored chunks of the stream that continue the base become part of it, and their
        bytes leave staging. Only while the base ends where the stream's next chunk starts
        (a truncation below it stops this; staging then keeps what follows). Lock held."""
        start = self.base_limit
        if not ids or start != self._absorbed_end or start not in (0, self.base.size):
            return
        prefix = self.base if start else EMPTY
        base = Manifest(prefix.chunks + tuple(ids), prefix.lengths + tuple(lengths))
        old, self.reader = self.reader, ChunkReader(base, self.svc.source, self.svc.read_pool,
                                                    self.svc.budget,
                                                    self.svc.readahead(base.size))
        old.close()
        self.base = base
        self.base_limit = self._absorbed_end = base.size
        self._absorbed += len(ids)
        self._final = None if self.staged else (self.reader, self.base_limit)
        if self.staging is not None:
            self.staging.punch(start, base.size)

    def _stream_read(self, offset: int, dest: memoryview) -> int:
        """For the StreamWriter thread: bytes it was told are final. No lock: the staging
        file is closed only after the stream stops, and a truncation it races with gives a
        short read, which ends the stream (the commit then chunks from staging)."""
        staging = self.staging
        if staging is None or not staging.spilled:
            return 0
        return staging.read_into(dest, offset)

    def truncate(self, length: int) -> None:
        with self.settled():
            if length == self.size and (self.dirty or length == self.base.size):
                return
            staging = self._staging()
            if length < self.base_limit:
                self._final = None
                self.base_limit = length
                self.staged = {b for b in self.staged if b * BLOCK < length}
            staging.truncate(length)
            if length == 0:
                if self.stream is not None:
                    self.stream.close()
                    self.stream = None
                self._seq_end = 0 if self.base_limit == 0 else None
                self._written_end = 0
            elif self._seq_end is not None and length < self._seq_end:
                self._seq_end = None
                self._end_stream(length)
            self._written_end = min(self._written_end, length)
            self.size = length
            self.dirty = True
            self.mtime_ns = time.time_ns()

    # -- committing -----------------------------------------------------------------------
    def build(self) -> Built:
        """The current content as a manifest. Chunks of large content are stored here
        already (durable, unreferenced until the commit); small content comes back as
        prepared chunks. Call with the lock held (see locked())."""
        ids: list[ChunkId] = []
        lengths: list[int] = []
        if self.stream is not None:           # its chunks become the end of the base
            self._end_stream(self._seq_end if self._seq_end is not None else self.size)
        if self.base_limit > 0:
            clean = min(self.base_limit, min(self.staged) * BLOCK) if self.staged \
                else self.base_limit
            # the chunks that end at or before the first changed byte are kept as they are
            k = self.base.locate(clean) if clean < self.base.size else len(self.base.chunks)
            ids, lengths = list(self.base.chunks[:k]), list(self.base.lengths[:k])
        start = sum(lengths)
        if start == self.size:
            return Built(Manifest(tuple(ids), tuple(lengths)))
        if self.size - start <= SMALL_COMMIT:
            buf = bytearray(self.size - start)
            self._read_merged(start, memoryview(buf))
            pieces: list[bytes | memoryview] = [memoryview(buf)] \
                if len(buf) <= chunking.MIN_SIZE else list(chunking.split(buf))
            # hashed only: compression waits for the commit (journal.apply), off the close
            prepared = [prepare(p, 0) for p in pieces]
            ids += [p.cid for p in prepared]
            lengths += [p.raw_len for p in prepared]
            return Built(Manifest(tuple(ids), tuple(lengths)), prepared)
        tail, _ = self.svc.pipeline().store_chunks(self._tail_chunks(start))
        return Built(Manifest(tuple(ids) + tail.chunks, tuple(lengths) + tail.lengths))

    def _tail_chunks(self, start: int) -> Iterator[bytes | memoryview]:
        """The chunks of [start, size), cut as chunking the whole file from start would."""
        staging = self._staging()
        view = staging.map() if start >= self.base_limit and staging.spilled else None
        if view is not None:                 # straight from the staging file, no copies
            try:
                for off, n in chunking.cut(view[start:self.size]):
                    yield view[start + off:start + off + n]
            finally:
                del view
            return
        yield from Cutter(self._read_merged, start).all(self.size)

    def committed(self, manifest: Manifest, key: bytes, ref: bytes,
                  node: NodeId | None = None) -> None:
        """The content of build() is now the committed version `key`. Lock held."""
        if node is not None:
            self.node = node
        self._drop_staging()
        old = self.reader
        self._set_base(manifest, key, ref)
        old.close()
        self.size = manifest.size
        self.dirty = False
        self.attrs = {}


