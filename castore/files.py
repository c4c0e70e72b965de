"""Files as manifests of chunks, and the ingest pipeline that cuts, hashes, compresses and
stores them.

A manifest lists (ChunkId, length) with cumulative offsets, so a read bisects to its chunk;
it is itself content-addressed (ChunkId of its encoding). A file version names its content by
a *content ref*: the 32-byte id of a stored manifest, or, for a file of one chunk, b"C" and
the chunk id (the manifest is implied, as IPFS does with raw leaves), or b"0" for an empty
file. The content id shown to users is the 64-hex manifest id or chunk id. Manifests carry a
reference count
(the number of namespace heads naming them). Chunks carry no count of their own: garbage
collection marks the chunks of every referenced manifest and sweeps the rest, so a commit
touches one counter, not one per chunk. Uses the store only; knows nothing of the tree.
"""
from __future__ import annotations

import bisect
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import NamedTuple

from castore import chunking, codec
from castore.errors import ChunkNotFoundError, IntegrityError
from castore.ids import ChunkId
from castore.store.lmdb import NEW_IDS, LmdbEnv, LmdbStore, LmdbTxn

_MAGIC = b"CSM1"
_HEAD = struct.Struct("<4sI")
_ENTRY = struct.Struct("<32sI")
_REFS = struct.Struct("<I")
BATCH_BYTES = 32 << 20          # chunk bytes per commit while a large file streams in


class Manifest:
    """The chunks of one file version, in order. `offsets` holds the start of each chunk
    plus the total size at the end. Immutable by convention."""

    __slots__ = ("chunks", "lengths", "offsets")

    def __init__(self, chunks: tuple[ChunkId, ...], lengths: tuple[int, ...]) -> None:
        if len(chunks) != len(lengths):
            raise ValueError("a manifest needs one length per chunk")
        self.chunks = chunks
        self.lengths = lengths
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and (self.chunks, self.lengths) == \
            (other.chunks, other.lengths)

    def __hash__(self) -> int:
        return hash((self.chunks, self.lengths))

    def __repr__(self) -> str:
        return f"Manifest({len(self.chunks)} chunks, {self.size} bytes)"

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def locate(self, offset: int) -> int:
        """Index of the chunk holding byte `offset` (len(chunks) at or past the end)."""
        return bisect.bisect_right(self.offsets, offset) - 1 if offset < self.size \
            else len(self.chunks)

    def encode(self) -> bytes:
        return _HEAD.pack(_MAGIC, len(self.chunks)) + b"".join(
            _ENTRY.pack(c.digest, n) for c, n in zip(self.chunks, self.lengths))

    @property
    def id(self) -> ChunkId:
        return ChunkId.of(self.encode())

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> Manifest:
        buf = bytes(buf)
        magic, count = _HEAD.unpack_from(buf, 0)
        if magic != _MAGIC or len(buf) != _HEAD.size + count * _ENTRY.size:
            raise IntegrityError("not a castore manifest")
        entries = [_ENTRY.unpack_from(buf, _HEAD.size + i * _ENTRY.size) for i in range(count)]
        return cls(tuple(ChunkId(d) for d, _ in entries), tuple(n for _, n in entries))


EMPTY = Manifest((), ())
INLINE = b"C"            # content ref prefix of a one-chunk file
EMPTY_REF = b"0"         # content ref of an empty file


def content_id(ref: bytes) -> str:
    """The 64-hex id users see for a content ref."""
    if len(ref) < 32:
        return EMPTY.id.hex
    return bytes(ref[-32:]).hex()


class Prepared(NamedTuple):
    """A chunk hashed and encoded, ready to store."""

    cid: ChunkId
    raw_len: int
    codec: int
    stored: bytes | memoryview


def prepare(data: bytes | memoryview, level: int) -> Prepared:
    """Hash and compress one chunk (both release the GIL, so this runs well on a pool)."""
    tag, stored = codec.encode(data, level)
    return Prepared(ChunkId.of(data), len(data), tag, stored)


class Files:
    """Manifests and chunk reference counts over one LmdbStore."""

    def __init__(self, store: LmdbStore) -> None:
        self.store = store

    # -- content refs ---------------------------------------------------------------------
    def put_content_in(self, txn: LmdbTxn, manifest: Manifest) -> bytes:
        """Store what a version needs to name this content, and return its content ref."""
        if not manifest.chunks:
            return EMPTY_REF
        if len(manifest.chunks) == 1:
            return INLINE + manifest.chunks[0].digest
        return self.put_manifest_in(txn, manifest).digest

    def manifest_for(self, txn: LmdbTxn, ref: bytes, size: int) -> Manifest:
        """The manifest a content ref names (size is the version's size)."""
        ref = bytes(ref)
        if len(ref) < 32:
            return EMPTY
        if len(ref) == 33 and ref[:1] == INLINE:
            return Manifest((ChunkId(ref[1:]),), (size,))
        return self.load_in(txn, ChunkId(ref))

    def chunk_count(self, txn: LmdbTxn, ref: bytes) -> int:
        if len(ref) < 32:
            return 0
        if len(ref) == 33:
            return 1
        raw = txn.get("manifests", bytes(ref))
        return (len(raw) - _REFS.size - _HEAD.size) // _ENTRY.size if raw is not None and \
            len(raw) > _REFS.size else 0

    def load_by_id(self, txn: LmdbTxn, cid: ChunkId) -> Manifest:
        """The content named by a user-visible content id: a manifest, or a single chunk."""
        if cid == EMPTY.id:
            return EMPTY
        if self.has_manifest_in(txn, cid):
            return self.load_in(txn, cid)
        info = self.store.chunk_info(txn, cid)
        if info is None:
            raise ChunkNotFoundError(f"no content {cid} in the local store")
        return Manifest((cid,), (info[0],))

    # -- manifests ------------------------------------------------------------------------
    def put_manifest_in(self, txn: LmdbTxn, manifest: Manifest) -> ChunkId:
        body = manifest.encode()
        mid = ChunkId.of(body)
        if txn.put("manifests", mid.digest, _REFS.pack(0) + body, overwrite=False):
            txn.cache.setdefault(NEW_IDS, []).append(mid)  # type: ignore[attr-defined]
        return mid

    def load_in(self, txn: LmdbTxn, mid: ChunkId) -> Manifest:
        raw = txn.get("manifests", mid.digest)
        if raw is None or len(raw) <= _REFS.size:
            raise ChunkNotFoundError(f"no manifest {mid} in the local store")
        body = bytes(raw[_REFS.size:])
        if ChunkId.of(body) != mid:
            raise IntegrityError(f"manifest {mid} is corrupt")
        return Manifest.decode(body)

    def has_manifest_in(self, txn: LmdbTxn, mid: ChunkId) -> bool:
        return txn.get("manifests", mid.digest) is not None

    def retain(self, txn: LmdbTxn, ref: bytes) -> None:
        """A version naming this content ref became a head."""
        if len(ref) == 32:
            self._adjust(txn, ChunkId(ref), +1)

    def release(self, txn: LmdbTxn, ref: bytes) -> None:
        """A version naming this content ref stopped being a head."""
        if len(ref) == 32:
            self._adjust(txn, ChunkId(ref), -1)

    def _adjust(self, txn: LmdbTxn, mid: ChunkId, delta: int) -> None:
        raw = txn.get("manifests", mid.digest)
        if raw is None:        # a version whose manifest has not arrived: count it anyway
            txn.put("manifests", mid.digest, _REFS.pack(max(0, delta)))
            return
        (refs,) = _REFS.unpack_from(raw, 0)
        txn.put("manifests", mid.digest, _REFS.pack(max(0, refs + delta)) + raw[_REFS.size:])

    def manifest_refs(self, txn: LmdbTxn, mid: ChunkId) -> int:
        raw = txn.get("manifests", mid.digest)
        return 0 if raw is None else int(_REFS.unpack_from(raw, 0)[0])

    # -- reading --------------------------------------------------------------------------
    def read_chunk(self, txn: LmdbTxn, cid: ChunkId) -> bytes:
        return self.store.get_in(txn, cid)

    def iter_range(self, env: LmdbEnv, manifest: Manifest, offset: int = 0,
                   length: int | None = None) -> Iterator[bytes]:
        """Yield the bytes of [offset, offset+length) chunk by chunk, each chunk verified."""
        end = manifest.size if length is None else min(manifest.size, offset + length)
        i = manifest.locate(offset)
        while offset < end and i < len(manifest.chunks):
            data = env.read(lambda t, c=manifest.chunks[i]: self.store.get_in(t, c))
            start = manifest.offsets[i]
            piece = data[offset - start:min(len(data), end - start)]
            yield piece
            offset += len(piece)
            i += 1


class ChunkPipeline:
    """Cuts a large file into chunks, hashes and compresses them on a thread pool, and commits
    them in batches of about BATCH_BYTES, each batch durable, on a thread of its own. The
    caller then commits the manifest and the namespace op in its own transaction; until then
    the chunks have no references, so a crash leaves no half file visible.
    """

    def __init__(self, env: LmdbEnv, store: LmdbStore, pool: ThreadPoolExecutor,
                 window: int = 8) -> None:
        self.env = env
        self.store = store
        self.pool = pool
        self.window = window

    def store_chunks(self, chunks: Iterable[bytes | memoryview],
                     on_bytes: Callable[[int], None] | None = None,
                     on_durable: Callable[[list[Prepared]], None] | None = None
                     ) -> tuple[Manifest, int]:
        """Store every chunk; returns (manifest, number of chunks newly stored).
        on_durable(batch), if given, is called in this thread, in file order, with each batch
        of chunks once its commit is durable (a file being written can then read those
        chunks from the store instead of keeping their bytes)."""
        level = self.store.level
        pending: deque[Future[Prepared]] = deque()
        batch: list[Prepared] = []
        batch_bytes = 0
        commits: deque[tuple[Future[int], list[Prepared]]] = deque()
        ids: list[ChunkId] = []
        lengths: list[int] = []
        new = 0
        # Batches commit one at a time on a thread of their own: a commit waiting for the
        # write lock must not hold a worker of the pool that hashes and compresses.
        writer: ThreadPoolExecutor | None = None

        def commit(items: list[Prepared]) -> int:
            return self.env.write(lambda t: sum(
                self.store.put_encoded_in(t, p.cid, p.raw_len, p.codec, p.stored) for p in items),
                bulk=True)

        def landed() -> None:
            nonlocal new
            fut, items = commits.popleft()
            new += fut.result()
            if on_durable:
                on_durable(items)

        def take() -> None:
            nonlocal batch, batch_bytes, writer
            p = pending.popleft().result()
            ids.append(p.cid)
            lengths.append(p.raw_len)
            batch.append(p)
            batch_bytes += p.raw_len
            if on_bytes:
                on_bytes(p.raw_len)
            while commits and commits[0][0].done():
                landed()
            if batch_bytes >= BATCH_BYTES:
                while len(commits) >= 2:
                    landed()
                if writer is None:
                    writer = ThreadPoolExecutor(1, thread_name_prefix="castore-commit")
                commits.append((writer.submit(commit, batch), batch))
                batch, batch_bytes = [], 0

        try:
            for chunk in chunks:
                pending.append(self.pool.submit(prepare, chunk, level))
                if len(pending) >= self.window:
                    take()
            while pending:
                take()
            while commits:
                landed()
        except BaseException:
            # e.g. disk full: let no commit of this file run on after the error is reported
            for f in pending:
                f.cancel()
            wait([*pending, *(f for f, _ in commits)])
            raise
        finally:
            if writer is not None:
                writer.shutdown(wait=False)
        if batch:
            new += commit(batch)
            if on_durable:
                on_durable(batch)
        return Manifest(tuple(ids), tuple(lengths)), new


def read_small(path: str | os.PathLike[str] | int, size: int) -> bytes:
    """Read a whole small file (fd or path)."""
    if isinstance(path, int):
        return os.pread(path, size + 1, 0)
    with open(path, "rb", buffering=0) as f:
        return f.read()


def chunks_of(data: bytes) -> Iterator[memoryview]:
    return chunking.split(data)
