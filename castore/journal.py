"""The close journal: files closed on the drive, kept safe before their commit.

A synced LMDB commit costs two fsyncs (1 to 10 ms on this kind of disk), so committing each
close on its own caps a program that writes many small files at a few hundred files/s. Instead
a close appends one record to this journal (a plain write: it is in the kernel's page cache
when close returns, so it survives the daemon being killed) and the drive commits the closed
files in groups. Each group's transaction also records how far the journal is applied; when
nothing is left to commit the journal starts again empty, under a new generation number. A
repo that opens with records not yet applied applies them first (Repo.open), so a file whose
close returned is never lost when the process dies. fsync still waits for the commit itself.

The journal lives beside the store. One process writes it (the one holding the repo).

    file    = header record*
    header  = b"CSJ1" generation:u64
    record  = length:u32 crc32:u32 body          (a torn or corrupt tail ends the journal)
    body    = see Intent.encode
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from castore import codec
from castore.errors import (CastoreError, ExistsError, PathNotFoundError, RepoError,
                            StorageFullError)
from castore.files import Files, Manifest, Prepared
from castore.ids import ChunkId, NodeId
from castore.namespace import Namespace
from castore.ops import Attrs, Kind, decode_attrs, encode_attrs, file_attrs, int_attr
from castore.store.lmdb import LmdbStore, LmdbTxn

log = logging.getLogger(__name__)

_MAGIC = b"CSJ1"
_HEADER = struct.Struct("<4sQ")
_RECORD = struct.Struct("<II")          # body length, crc32 of the body
_BODY = struct.Struct("<B16s16sHB24sIqI")  # flags, node, parent, name len, base key len,
#                                            base key, mode, mtime, chunk count
_CHUNK = struct.Struct("<32sIBI")       # chunk id, raw length, codec, stored length
_POSITION = struct.Struct("<QQ")        # generation, journal offset applied up to
POSITION_KEY = b"journal"               # in the store's meta table
MAX_RECORD = 64 << 20
_HAS_NODE = 1
_HAS_BASE = 2
_ATTRS_ONLY = 4


@dataclass(slots=True)
class Intent:
    """One closed file to commit: its new content (the manifest, and the chunks not stored
    yet), where it goes (its node, or a parent and name for a file created here), the version
    it replaces, and its attributes. With attrs_only, a change of attributes of a committed
    node (chmod, chown, utimens, xattrs): no content, no new version."""

    manifest: Manifest
    prepared: list[Prepared]
    node: NodeId | None
    parent: NodeId | None
    name: bytes
    base_key: bytes | None
    mode: int
    mtime_ns: int
    attrs: Attrs = field(default_factory=dict)
    attrs_only: bool = False

    @classmethod
    def of_attrs(cls, node: NodeId, attrs: Attrs) -> Intent:
        return cls(Manifest((), ()), [], node, None, b"", None, 0, 0, dict(attrs), True)

    @classmethod
    def of_attrs_at(cls, parent: NodeId, name: bytes, attrs: Attrs) -> Intent:
        """A change of attributes of the file named name in parent when it is applied: a
        file created here whose own intent comes earlier in the journal (it has no node
        yet; no rename or unlink through the drive comes between the two)."""
        return cls(Manifest((), ()), [], None, parent, name, None, 0, 0, dict(attrs), True)

    def encode(self) -> bytes:
        flags = (_HAS_NODE if self.node is not None else 0) | \
            (_HAS_BASE if self.base_key else 0) | (_ATTRS_ONLY if self.attrs_only else 0)
        base = self.base_key or b""
        parts = [_BODY.pack(flags, self.node.raw if self.node else b"",
                            self.parent.raw if self.parent else b"", len(self.name),
                            len(base), base, self.mode, self.mtime_ns, len(self.prepared)),
                 self.name]
        for p in self.prepared:
            parts.append(_CHUNK.pack(p.cid.digest, p.raw_len, p.codec, len(p.stored)))
            parts.append(p.stored)
        parts.append(encode_attrs(self.attrs))
        parts.append(self.manifest.encode())
        return b"".join(parts)

    @classmethod
    def decode(cls, body: bytes) -> Intent:
        (flags, node, parent, name_len, base_len, base, mode, mtime, count) = \
            _BODY.unpack_from(body, 0)
        pos = _BODY.size
        name = body[pos:pos + name_len]
        pos += name_len
        prepared = []
        for _ in range(count):
            digest, raw_len, codec, n = _CHUNK.unpack_from(body, pos)
            pos += _CHUNK.size
            prepared.append(Prepared(ChunkId(digest), raw_len, codec, body[pos:pos + n]))
            pos += n
        attrs, pos = decode_attrs(body, pos)
        return cls(Manifest.decode(body[pos:]), prepared,
                   NodeId(node) if flags & _HAS_NODE else None,
                   None if flags & _HAS_NODE else NodeId(parent), name,
                   base[:base_len] if flags & _HAS_BASE else None, mode, mtime, attrs,
                   bool(flags & _ATTRS_ONLY))


def apply(txn: LmdbTxn, ns: Namespace, files: Files, store: LmdbStore, intent: Intent
          ) -> tuple[NodeId, bytes, bytes]:
    """Commit one closed file inside txn: its chunks, its manifest and the namespace op.
    Returns (node, version key, content ref). Raises PathNotFoundError when the file or the
    directory of a new file went away meanwhile, ExistsError when a directory took its name.
    An attrs_only intent sets the attributes of its node (version key and ref are empty)."""
    if intent.attrs_only:
        nid = intent.node
        if nid is None:
            assert intent.parent is not None
            nid = ns.lookup(txn, intent.parent, intent.name)
        target = ns.get(txn, nid) if nid is not None else None
        if target is None:
            raise PathNotFoundError("a node was removed before its attributes were committed")
        ns.set_attrs(txn, target, intent.attrs)
        return target.id, b"", b""
    for p in intent.prepared:
        if p.codec == codec.RAW:            # closes journal raw chunks: compressed here
            store.put_raw_in(txn, p.cid, p.stored)
        else:
            store.put_encoded_in(txn, p.cid, p.raw_len, p.codec, p.stored)
    ref = files.put_content_in(txn, intent.manifest)
    size = intent.manifest.size
    if intent.node is None:
        assert intent.parent is not None
        parent = ns.get(txn, intent.parent)
        if parent is None or parent.kind != Kind.DIR:
            raise PathNotFoundError("the directory of a new file went away")
        attrs: Attrs = {**intent.attrs, **file_attrs(intent.mode, intent.mtime_ns)}
        existing = ns.lookup(txn, parent.id, intent.name)
        if existing is not None:            # made meanwhile elsewhere: a new version of it
            node = ns.get(txn, existing)
            if node is None or node.kind != Kind.FILE:
                raise ExistsError(f"{os.fsdecode(intent.name)} was created meanwhile by "
                                  "another peer")
            return node.id, ns.set_content(txn, node, ref, size, attrs), ref
        made = ns.create(txn, parent, intent.name, Kind.FILE, attrs, ref, size,
                         known_absent=True)
        assert made.head is not None
        return made.id, made.head.key, ref
    node = ns.get(txn, intent.node)
    if node is None:
        raise PathNotFoundError("the file was removed while it was open")
    parents = (intent.base_key,) if intent.base_key else None
    key = ns.set_content(txn, node, ref, size,
                         {**intent.attrs, b"mtime": int_attr(intent.mtime_ns)}, parents)
    return node.id, key, ref


def mark_applied(txn: LmdbTxn, generation: int, offset: int) -> None:
    txn.put("meta", POSITION_KEY, _POSITION.pack(generation, offset))


def applied(txn: LmdbTxn) -> tuple[int, int]:
    raw = txn.get("meta", POSITION_KEY)
    return _POSITION.unpack(bytes(raw)) if raw is not None else (0, 0)


class Journal:
    """The append-only file of closes not yet committed. Thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mutex = threading.Lock()
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RepoError(f"cannot open the close journal {self.path}: {exc.strerror}") \
                from None
        self.generation = 0
        self._end = 0
        header = os.pread(self._fd, _HEADER.size, 0)
        if len(header) == _HEADER.size and header[:4] == _MAGIC:
            self.generation = _HEADER.unpack(header)[1]
            self._end = os.fstat(self._fd).st_size
        else:
            self.reset()

    def close(self) -> None:
        with self._mutex:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    @property
    def empty(self) -> bool:
        return self._end <= _HEADER.size

    @property
    def size(self) -> int:
        return self._end

    def append(self, intent: Intent) -> int:
        """Write one record; returns the journal offset after it. StorageFullError when the
        disk is full (nothing of the record stays behind)."""
        body = intent.encode()
        if len(body) > MAX_RECORD:
            raise StorageFullError("a closed file's last chunks are too large for the journal")
        record = _RECORD.pack(len(body), zlib.crc32(body)) + body
        with self._mutex:
            start = self._end
            try:
                view = memoryview(record)
                pos = start
                while view:
                    n = os.pwrite(self._fd, view, pos)
                    view = view[n:]
                    pos += n
            except OSError as exc:
                try:
                    os.ftruncate(self._fd, start)
                except OSError:
                    pass
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StorageFullError("disk full: the close journal could not grow") \
                        from None
                raise RepoError(f"cannot write the close journal: {exc.strerror}") from None
            self._end = start + len(record)
            return self._end

    def reset(self) -> None:
        """Start again empty, under a new generation (every record is applied)."""
        with self._mutex:
            self.generation = int.from_bytes(os.urandom(8), "little") or 1
            header = _HEADER.pack(_MAGIC, self.generation)
            try:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, header, 0)
            except OSError as exc:
                raise RepoError(f"cannot reset the close journal: {exc.strerror}") from None
            self._end = len(header)

    def records(self) -> Iterator[tuple[int, Intent]]:
        """(offset after, intent) of every whole record, in order."""
        pos = _HEADER.size
        while True:
            head = os.pread(self._fd, _RECORD.size, pos)
            if len(head) < _RECORD.size:
                return
            length, crc = _RECORD.unpack(head)
            if length > MAX_RECORD:
                log.warning("close journal %s: a record at %d is corrupt; the rest is "
                            "ignored", self.path, pos)
                return
            body = os.pread(self._fd, length, pos + _RECORD.size)
            if len(body) < length or zlib.crc32(body) != crc:
                return                      # torn tail: that close never returned
            pos += _RECORD.size + length
            try:
                yield pos, Intent.decode(body)
            except (struct.error, ValueError, CastoreError) as exc:
                log.warning("close journal %s: a record at %d does not decode (%s); "
                            "skipped", self.path, pos, exc)


__all__ = ["Intent", "Journal", "apply", "applied", "mark_applied"]
