"""LMDB storage: the environment (named sub-databases, durable commits, map growth, full-disk
handling) and LmdbStore, the BlobStore over it. The only module that imports lmdb.

Durability: sync=True, metasync=True, writemap=False. A commit that returned is on disk and
survives kill -9 and power loss; writemap=True is avoided because it dies with SIGBUS when the
disk fills. LMDB keeps no checksums, so every chunk is re-hashed on read (IntegrityError).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import lmdb

from castore import codec
from castore.errors import (ChunkNotFoundError, DeadlineError, RepoError,
                            StorageFullError)
from castore.ids import ChunkId
from castore.store import StoredChunk
from castore.store.memory import verify
from castore.store.readahead import ASK, Readahead

if TYPE_CHECKING:
    from castore.store import BlobStore

log = logging.getLogger(__name__)
T = TypeVar("T")

DBS = ("chunks", "chunkmeta", "manifests", "ops", "opseq", "nodes", "dirents", "superseded",
       "meta", "held", "revived")
DEFAULT_MAP_SIZE = 1 << 40          # sparse: the file grows only to what is used
MAX_MAP_SIZE = 1 << 44
WRITE_WAIT = 120.0              # seconds a write waits for the one before it, then DeadlineError
MEMO_ENTRIES = 200_000          # entries a snapshot's shared read memo holds before a new one
PREWARM_SHARE = 16              # a walk asks for the whole store while data.mdb is at most
                                # this share of the machine's memory (1/16); see prewarm()
PREWARM_EVERY = 60.0            # seconds before a store still in memory is asked for again
PREWARM_LOOK = 2.0              # seconds between looks at whether it still is
PREWARM_GONE = 0.5              # in memory below this share, it is asked for again at once
DROP_BEHIND = 8 << 20           # a commit that appends at least this much leaves the page cache
_META = struct.Struct("<IB")        # raw_len, codec
_COUNTERS = ("chunks", "raw_bytes", "stored_bytes")
NEW_IDS = "castore.new_ids"     # txn.cache: ids of chunks and manifests this commit added
QUIET = "castore.quiet"         # txn.cache: set when the commit must not notify on_commit


class LmdbTxn:
    """KvTxn over one lmdb transaction. Values are memoryviews valid inside it only."""

    __slots__ = ("_txn", "_dbs", "counters", "cache", "before_commit", "after_commit")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database],
                 memo: dict[str, object] | None = None) -> None:
        self._txn = txn
        self._dbs = dbs
        self.counters: dict[str, int] = {}
        # memo of upper layers: per write transaction, per snapshot for reads (see
        # LmdbEnv.read); what is kept there is derived from the snapshot's data alone
        self.cache: dict[str, object] = {} if memo is None else memo
        self.before_commit: list[Callable[[], None]] = []
        self.after_commit: list[Callable[[], None]] = []

    def get(self, db: str, key: bytes) -> bytes | None:
        return self._txn.get(key, db=self._dbs[db])

    def put(self, db: str, key: bytes, value: bytes | memoryview, overwrite: bool = True) -> bool:
        return bool(self._txn.put(key, value, db=self._dbs[db], overwrite=overwrite))

    def delete(self, db: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._dbs[db]))

    def scan(self, db: str, prefix: bytes = b"", start: bytes | None = None,
             reverse: bool = False) -> Iterator[tuple[bytes, bytes]]:
        cur = self._txn.cursor(db=self._dbs[db])
        if reverse:
            seek = start if start is not None else prefix + b"\xff" * 64
            if cur.set_range(seek):
                if bytes(cur.key()) > seek:
                    if not cur.prev():
                        return
            elif not cur.last():
                return
            while True:
                k = bytes(cur.key())
                if not k.startswith(prefix):
                    if k < prefix:
                        return
                else:
                    yield k, cur.value()
                if not cur.prev():
                    return
        else:
            seek = max(prefix, start) if start is not None else prefix
            if not cur.set_range(seek):
                return
            for k, v in cur:
                k = bytes(k)
                if not k.startswith(prefix):
                    return
                yield k, v

    def count(self, name: str, delta: int) -> None:
        self.counters[name] = self.counters.get(name, 0) + delta

    def txn_id(self) -> int:
        """LMDB's id of this transaction: for a read, the commit its snapshot shows; for a
        write, the id its commit will have. Ids grow with every commit."""
        return int(self._txn.id())


def _is_disk_full(exc: lmdb.Error) -> bool:
    text = str(exc)
    return any(s in text for s in ("No space left", "Input/output error", "Disk quota",
                                   "MDB_TXN_FULL", "ENOSPC", "EIO"))


def memory_bytes() -> int:
    """The machine's physical memory (0 if unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class LmdbEnv:
    """One LMDB environment of a repo, shared by every thread of the process.

    write(fn) runs fn(txn) in a write transaction and commits durably; on MapFullError the map
    doubles and fn runs again, so fn must be safe to re-run. A full disk raises
    StorageFullError: the transaction is rolled back, committed data stays readable, and the
    next write succeeds once space returns.
    """

    def __init__(self, path: str | os.PathLike[str], map_size: int = DEFAULT_MAP_SIZE,
                 max_readers: int = 512, readonly: bool = False) -> None:
        self.path = Path(path)
        self._map_size = map_size
        self._max_readers = max_readers
        self._readonly = readonly
        # Map growth needs every transaction of this process closed: a gate of active txns.
        self._gate = threading.Condition()
        self._active = 0
        self._resizing = False
        self._write_mutex = threading.Lock()
        self.write_wait = WRITE_WAIT
        self.drop_behind = DROP_BEHIND
        self._data_fd = -1
        self._memo: tuple[int, dict[str, object]] = (-1, {})
        self._memo_reads = 0
        self._prewarm_mutex = threading.Lock()
        self._prewarmed_at = -PREWARM_EVERY
        self._prewarm_looked = -PREWARM_LOOK
        self.prewarms = 0       # whole-store reads started (see prewarm)
        # called after each durable commit that added chunks or manifests (replication)
        self.on_commit: Callable[[list[ChunkId]], None] | None = None
        self._open()

    def _open(self) -> None:
        try:
            if not self._readonly:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.env = lmdb.open(str(self.path), map_size=self._map_size, max_dbs=len(DBS) + 2,
                                 max_readers=self._max_readers, sync=True, metasync=True,
                                 writemap=False, readahead=False, readonly=self._readonly,
                                 meminit=False)
        except lmdb.Error as exc:
            raise RepoError(f"cannot open the store at {self.path}: {exc}") from None
        self.dbs = {name: self.env.open_db(name.encode(), create=not self._readonly)
                    for name in DBS}
        if not self._readonly:
            self.env.reader_check()      # clear reader slots of killed processes
            self._psize = int(self.env.stat()["psize"])
            self._data_fd = os.open(self.path / "data.mdb", os.O_RDONLY | os.O_CLOEXEC)

    def prewarm(self) -> bool:
        """Ask the kernel for the whole data file at once, from a thread of its own, when it is
        at most 1/PREWARM_SHARE of the machine's memory; again within PREWARM_EVERY seconds
        only when less than PREWARM_GONE of it is still in memory (mincore(2): memory
        pressure or drop_caches took it meanwhile), looked at every PREWARM_LOOK seconds at
        most. Returns whether it started.

        For walks of the tree (castore.vfs calls it when many files are read in a short
        time): nodes, chunk metadata and chunks are B-trees keyed by id and hash, so the
        small files of one directory lie anywhere in data.mdb, and a cold walk reads them one
        4 KiB page fault at a time (a tar c of 4,150 files took 10,700 faults). Read whole and
        in order instead, a small store is in memory a moment later. The map itself stays without
        kernel readahead: with it (LMDB's default), the same tar c ran 30% faster but a cold
        sequential read of a large file 10% slower, and a store much larger than memory would
        read 8 MiB around every random lookup here."""
        with self._prewarm_mutex:
            now = time.monotonic()
            if self._data_fd < 0 or now - self._prewarm_looked < PREWARM_LOOK:
                return False
            self._prewarm_looked = now
            memory = memory_bytes()
            try:                  # advice only: never an error for the caller
                size = os.fstat(self._data_fd).st_size
                if not memory or not size or size * PREWARM_SHARE > memory:
                    return False
                if (now - self._prewarmed_at < PREWARM_EVERY and
                        resident_share(self._data_fd, size) >= PREWARM_GONE):
                    return False
                fd = os.dup(self._data_fd)
            except (OSError, ValueError) as exc:      # ValueError: mmap's, in resident_share
                log.debug("prewarm: %s", exc)
                return False
            self._prewarmed_at = now
            self.prewarms += 1
        threading.Thread(target=_willneed, args=(fd, size), name="castore-prewarm",
                         daemon=True).start()
        return True

    def close(self) -> None:
        self.env.close()
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1

    def _drop_behind(self, last_pgno: int) -> None:
        """Chunk bytes are written once and read much later: a bulk commit that appended at
        least drop_behind bytes asks the kernel to drop the pages it wrote from the page cache
        (they are clean after the durable commit), so an ingest recycles a small set of cache
        pages instead of pushing out everything else; where fresh cache pages are costly
        (virtual machines that hand freed memory back to the host) it also makes large commits
        faster. Namespace commits keep their pages (lookups read them next), and so do chunks
        handed to on_commit: replication reads those right away. The few B-tree pages of the
        chunk tables among those appended are read back from disk when next needed."""
        end = int(self.env.info()["last_pgno"])
        if (end - last_pgno) * self._psize >= self.drop_behind > 0:
            try:
                os.posix_fadvise(self._data_fd, (last_pgno + 1) * self._psize,
                                 (end - last_pgno) * self._psize, os.POSIX_FADV_DONTNEED)
            except OSError:     # advice only
                pass

    @contextmanager
    def _entered(self) -> Iterator[None]:
        self._enter()
        try:
            yield
        finally:
            self._leave()

    # _enter/_leave bracket every transaction (read() calls them directly: a generator
    # context manager costs more than the rest of a small read)
    def _enter(self) -> None:
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._active += 1

    def _leave(self) -> None:
        with self._gate:
            self._active -= 1
            if self._resizing:          # only _grow waits for transactions to end
                self._gate.notify_all()

    def read(self, fn: Callable[[LmdbTxn], T]) -> T:
        """Run fn in a read transaction (a consistent snapshot)."""
        for _ in range(3):
            self._enter()
            try:
                with self.env.begin(buffers=True) as txn:
                    return fn(LmdbTxn(txn, self.dbs, self._snapshot_memo(txn)))
            except lmdb.MapResizedError:
                pass
            finally:
                self._leave()
            self._grow(0)          # another process grew the map: adopt its size
        raise RepoError("the store's map keeps changing size under this reader")

    def _snapshot_memo(self, txn: lmdb.Transaction) -> dict[str, object]:
        """The memo that read transactions of one snapshot share: they see the same data, so
        what one of them decoded (the namespace's nodes) serves the next, until a commit
        makes a new snapshot. A walk of the drive reads every node in several requests."""
        tid = txn.id()
        memo = self._memo
        if memo[0] != tid:
            memo = self._memo = (tid, {})
        else:
            self._memo_reads += 1
            # its size, now and then (it costs µs); list() copies the values at once, as
            # readers in other threads may add to the memo meanwhile
            if not self._memo_reads % 64 and sum(
                    len(v) for v in list(memo[1].values())  # type: ignore[arg-type]
                    if hasattr(v, "__len__")) > MEMO_ENTRIES:
                memo = self._memo = (tid, {})
        return memo[1]

    def write(self, fn: Callable[[LmdbTxn], T], bulk: bool = False) -> T:
        """Run fn in a write transaction and commit durably. Retries fn after growing the map.
        bulk: the commit stores chunk bytes only (no namespace records): its pages may leave
        the page cache once durable (see _drop_behind)."""
        if self._readonly:
            raise RepoError("the store is open read-only")
        if not self._write_mutex.acquire(timeout=self.write_wait):
            raise DeadlineError(f"a write to {self.path} waited {self.write_wait:.0f} s for the "
                                "one before it (the disk is stalled or very slow); nothing "
                                "was written")
        try:
            while True:
                grow = False
                with self._entered():
                    txn = self.env.begin(write=True, buffers=True)
                    last_pgno = int(self.env.info()["last_pgno"]) if bulk else 0
                    wrapped = LmdbTxn(txn, self.dbs)
                    try:
                        result = fn(wrapped)
                        for hook in wrapped.before_commit:
                            hook()
                        if wrapped.counters:
                            _flush_counters(wrapped)
                        txn.commit()
                        new = wrapped.cache.get(NEW_IDS)
                        if new and self.on_commit is not None and \
                                not wrapped.cache.get(QUIET):
                            self.on_commit(new)  # type: ignore[arg-type]
                        elif bulk:      # nobody here reads these pages soon
                            self._drop_behind(last_pgno)
                        for hook in wrapped.after_commit:
                            try:
                                hook()
                            except Exception:  # committed: a listener's bug changes nothing
                                log.exception("after a commit")
                        return result
                    except lmdb.MapFullError:
                        txn.abort()
                        grow = True
                    except lmdb.MapResizedError:
                        txn.abort()
                        grow = True
                    except lmdb.Error as exc:
                        txn.abort()
                        if _is_disk_full(exc):
                            raise StorageFullError(f"disk full: the write to {self.path} was "
                                                   "rolled back; committed data is intact") \
                                from None
                        raise
                    except BaseException:
                        txn.abort()
                        raise
                if grow:
                    self._grow(self.env.info()["map_size"] * 2)
        finally:
            self._write_mutex.release()

    def _grow(self, new_size: int) -> None:
        if new_size > MAX_MAP_SIZE:
            raise StorageFullError(f"the store map reached its limit of {MAX_MAP_SIZE} bytes")
        with self._gate:
            self._resizing = True
            try:
                while self._active:
                    self._gate.wait()
                self.env.set_mapsize(new_size)
                if new_size:
                    log.info("store map grown to %d MiB", new_size >> 20)
            finally:
                self._resizing = False
                self._gate.notify_all()

    def map_size(self) -> int:
        return int(self.env.info()["map_size"])

    def disk_usage(self) -> int:
        return sum(f.stat().st_size for f in self.path.glob("*.mdb"))


_libc = ctypes.CDLL(None, use_errno=True)
_LOW_BIT = bytes(i & 1 for i in range(256))


def resident_share(fd: int, end: int, start: int = 0) -> float:
    """The share of the file's bytes [start, end) that is in the page cache (mincore(2) over
    a private map of them, which reads nothing)."""
    start -= start % mmap.PAGESIZE
    length = end - start
    pages = (length + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = ctypes.create_string_buffer(pages)
    with mmap.mmap(fd, length, access=mmap.ACCESS_COPY, offset=start) as m:
        view = ctypes.c_char.from_buffer(m)        # its address (a private map is writable)
        try:
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(length),
                             vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            del view
    # bit 0 of each byte says whether the page is resident; the others are reserved
    return vec.raw[:pages].translate(_LOW_BIT).count(1) / pages


def _willneed(fd: int, size: int) -> None:
    """Ask the kernel for a file's first size bytes (ASK at a time: it drops the rest of a
    larger request), then close fd."""
    try:
        for at in range(0, size, ASK):
            os.posix_fadvise(fd, at, min(ASK, size - at), os.POSIX_FADV_WILLNEED)
    except OSError as exc:      # advice only
        log.debug("prewarm: %s", exc)
    finally:
        os.close(fd)


def _run_hook(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:   # the commit is durable; a failing listener must not undo the write
        log.exception("an after-commit hook failed")


def _flush_counters(txn: LmdbTxn) -> None:
    for name, delta in txn.counters.items():
        key = b"count:" + name.encode()
        old = txn.get("meta", key)
        value = (int.from_bytes(old, "little", signed=True) if old is not None else 0) + delta
        txn.put("meta", key, value.to_bytes(8, "little", signed=True))
    txn.counters.clear()


def read_counters(txn: LmdbTxn) -> dict[str, int]:
    out = {}
    for name in _COUNTERS:
        v = txn.get("meta", b"count:" + name.encode())
        out[name] = int.from_bytes(v, "little", signed=True) if v is not None else 0
    return out


class LmdbStore:
    """BlobStore over an LmdbEnv: chunk bytes in `chunks`, (raw_len, codec) in `chunkmeta`.

    The *_in methods run inside a caller's transaction, so a file commit can store its chunks,
    manifest, reference counts and tree op atomically.
    """

    def __init__(self, env: LmdbEnv, level: int = codec.DEFAULT_LEVEL) -> None:
        self.env = env
        self.level = level

    # -- inside a transaction -------------------------------------------------------------
    def put_encoded_in(self, txn: LmdbTxn, cid: ChunkId, raw_len: int, tag: int,
                       stored: bytes | memoryview) -> bool:
        """Store already-verified, already-encoded bytes. True if newly stored."""
        if not txn.put("chunkmeta", cid.digest, _META.pack(raw_len, tag), overwrite=False):
            return False
        txn.put("chunks", cid.digest, stored)
        txn.cache.setdefault(NEW_IDS, []).append(cid)  # type: ignore[attr-defined]
        txn.count("chunks", 1)
        txn.count("raw_bytes", raw_len)
        txn.count("stored_bytes", len(stored))
        return True

    def put_raw_in(self, txn: LmdbTxn, cid: ChunkId, data: bytes | memoryview) -> bool:
        """Store raw bytes already verified against cid, compressed here if they are new
        (a chunk already held costs no compression). True if newly stored."""
        if self.has_in(txn, cid):
            return False
        tag, stored = codec.encode(data, self.level)
        return self.put_encoded_in(txn, cid, len(data), tag, stored)

    def view_in(self, txn: LmdbTxn, cid: ChunkId, readahead: Readahead | None = None
                ) -> tuple[int, int, memoryview]:
        """(codec, raw length, stored bytes) of a chunk, neither copied nor verified: the view
        is valid inside txn only. For readers that verify once and copy straight out."""
        meta = txn.get("chunkmeta", cid.digest)
        stored = txn.get("chunks", cid.digest)
        if meta is None or stored is None:
            raise ChunkNotFoundError(f"no chunk {cid} in the local store")
        if readahead is not None:
            readahead.after(stored)
        raw_len, tag = _META.unpack(meta)
        return tag, raw_len, memoryview(stored)

    def has_in(self, txn: LmdbTxn, cid: ChunkId) -> bool:
        return txn.get("chunkmeta", cid.digest) is not None

    def get_in(self, txn: LmdbTxn, cid: ChunkId, readahead: Readahead | None = None) -> bytes:
        """The chunk's verified bytes. A sequential reader passes its Readahead so the next
        chunks are already on their way from disk."""
        tag, raw_len, stored = self.view_in(txn, cid, readahead)
        data = codec.decode(tag, stored, raw_len)
        verify(cid, data)
        return bytes(data)

    def delete_in(self, txn: LmdbTxn, cid: ChunkId) -> bool:
        meta = txn.get("chunkmeta", cid.digest)
        if meta is None:
            return False
        raw_len, _ = _META.unpack(meta)
        stored = txn.get("chunks", cid.digest)
        txn.count("chunks", -1)
        txn.count("raw_bytes", -raw_len)
        txn.count("stored_bytes", -(len(stored) if stored is not None else 0))
        txn.delete("chunkmeta", cid.digest)
        txn.delete("chunks", cid.digest)
        return True

    # -- BlobStore ------------------------------------------------------------------------
    def has(self, cid: ChunkId) -> bool:
        return self.env.read(lambda t: self.has_in(t, cid))

    def get(self, cid: ChunkId) -> bytes:
        return self.env.read(lambda t: self.get_in(t, cid))

    def put(self, cid: ChunkId, data: bytes | memoryview) -> bool:
        return self.put_many([(cid, data)]) == 1

    def put_many(self, items: Iterable[tuple[ChunkId, bytes | memoryview]]) -> int:
        """Verify, encode and store many chunks in one durable commit. Returns how many were new."""
        encoded = []
        for cid, data in items:
            verify(cid, data)
            tag, stored = codec.encode(data, self.level)
            encoded.append((cid, len(data), tag, stored))
        return self.env.write(
            lambda t: sum(self.put_encoded_in(t, c, n, g, s) for c, n, g, s in encoded),
            bulk=True)

    def delete(self, cid: ChunkId) -> None:
        self.env.write(lambda t: self.delete_in(t, cid))

    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]:
        start = after.digest if after else None
        while True:
            page = self.env.read(lambda t: _page(t, start))
            for key in page:
                if start is not None and key == start:
                    continue
                yield ChunkId(key)
            if len(page) < 1000:
                return
            start = page[-1]

    def get_stored(self, cid: ChunkId) -> StoredChunk:
        def fetch(t: LmdbTxn) -> StoredChunk:
            meta, stored = t.get("chunkmeta", cid.digest), t.get("chunks", cid.digest)
            if meta is None or stored is None:
                raise ChunkNotFoundError(f"no chunk {cid} in the local store")
            raw_len, tag = _META.unpack(meta)
            return StoredChunk(tag, raw_len, bytes(stored))
        return self.env.read(fetch)

    def put_stored(self, cid: ChunkId, chunk: StoredChunk) -> bool:
        verify(cid, codec.decode(chunk.codec, chunk.data, chunk.raw_len))
        return self.env.write(
            lambda t: self.put_encoded_in(t, cid, chunk.raw_len, chunk.codec, chunk.data))

    def chunk_info(self, txn: LmdbTxn, cid: ChunkId) -> tuple[int, int] | None:
        """(raw length, codec) of a stored chunk, or None."""
        meta = txn.get("chunkmeta", cid.digest)
        return None if meta is None else _META.unpack(meta)


def _page(txn: LmdbTxn, start: bytes | None) -> list[bytes]:
    out = []
    for key, _ in txn.scan("chunkmeta", start=start):
        out.append(key)
        if len(out) >= 1000:
            break
    return out


if TYPE_CHECKING:
    _: type[BlobStore] = LmdbStore
