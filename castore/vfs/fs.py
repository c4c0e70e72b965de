"""The store as a file system (DESIGN.md sections 5 and 8): paths to nodes, open files shared
by all their descriptors, staging and commits. Unit-testable without a mount: no FUSE imports;
castore.fuse only translates calls and errors to this API.

Semantics. open() binds a file to the newest version known here; every descriptor of it on this
peer shares one OpenFile, so a write through one is read through another at once, and a file
unlinked while open stays readable and writable through its descriptors. close() (flush)
commits a new version: chunks, manifest and namespace op in one LMDB transaction, durable when
close returns. A version committed elsewhere meanwhile does not change the bytes under a
descriptor that is already open; the next open sees it. A file created here is only put in the
namespace by its first commit, together with its content (one op).

Unlinked open files: libfuse renames a file that is unlinked while open to .fuse_hiddenXXXX
and unlinks that name at the last close. Here that rename deletes the file from the namespace
and keeps the hidden name as an alias of its open state only, so hidden names never show in
listings nor keep a directory from being removed.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from castore import codec
from castore.errors import (CastoreError, ChunkNotFoundError, ExistsError, InvalidNameError,
                            IsDirectoryError, NotDirectoryError, NotEmptyError,
                            PathNotFoundError)
from castore.files import EMPTY, EMPTY_REF, ChunkPipeline, content_id
from castore.ids import ROOT, ChunkId, NodeId
from castore.ops import Attrs, Kind, Node, Version, int_attr, split_path
from castore.repo import Repo
from castore.store.lmdb import LmdbTxn
from castore.store.memory import verify
from castore.store.readahead import Readahead
from castore.vfs.openfile import FileServices, OpenFile
from castore.vfs.readcache import Budget, DeadlineError

log = logging.getLogger(__name__)
T = TypeVar("T")

RENAME_NOREPLACE = 1
XATTR_CREATE, XATTR_REPLACE = 1, 2
XATTR_MAX = 64 << 10
CASTORE_XATTRS = ("user.castore.id", "user.castore.chunks")
_HIDDEN = re.compile(rb"^\.fuse_hidden[0-9a-f]{16}$")
KERNEL_VERSIONS = 100_000       # files whose cached version is remembered (keep_cache)
REGISTRY_TIMEOUT = 10.0
NLINK_TTL = 1.0                 # seconds a directory's subdirectory count is cached
STAT_CACHE = 100_000            # stat results cached at most


class NoAttributeError(CastoreError):
    """No extended attribute of that name (ENODATA)."""


class NotPermittedError(CastoreError):
    """The operation is refused here: hard links, writing castore's own xattrs (EPERM)."""


class UnsupportedError(CastoreError):
    """The drive does not support this (ENOTSUP): xattrs outside the user namespace, ..."""


class AttributeTooLargeError(CastoreError):
    """An extended attribute value over 64 KiB (E2BIG)."""


@dataclass(frozen=True, slots=True)
class Attr:
    """What stat reports. mode holds the permission bits only; kind gives the file type."""

    kind: Kind
    mode: int
    size: int
    mtime_ns: int
    nlink: int = 1
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True, slots=True)
class Opened:
    """An open file handle, and whether the kernel may keep pages it cached for this file
    (the version is the one it cached them from)."""

    fh: int
    keep_cache: bool


@dataclass(slots=True)
class Handle:
    of: OpenFile
    writable: bool
    append: bool


@dataclass(slots=True)
class _Target:
    node: Node | None            # committed node; None for a pending create or hidden name
    of: OpenFile | None          # the open state in use for it, if any
    version: bytes | None = None  # the head a conflict copy shows
    parent: Node | None = None
    name: bytes = b""


class Vfs:
    """The drive's file system over one Repo. Thread-safe: FUSE calls it from many threads.

    Paths are str (as mfusepy decodes them: UTF-8 with surrogateescape) or bytes. Errors are
    CastoreErrors (castore.errors plus the few defined here); anything else is a bug.
    """

    def __init__(self, repo: Repo, staging_dir: str | os.PathLike[str] | None = None, *,
                 lock_timeout: float = 30.0) -> None:
        self.repo = repo
        self._env, self._ns, self._store, self._files = repo.env, repo.ns, repo.store, repo.files
        self.staging_dir = Path(staging_dir or repo.config.home / "staging")
        self.staging_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started_ns = time.time_ns()
        self._read_pool = ThreadPoolExecutor(3, thread_name_prefix="castore-vfs-read")
        self._write_pool = ThreadPoolExecutor(3, thread_name_prefix="castore-vfs-write")
        self._svc = FileServices(
            source=_StoreSource(self), read_pool=self._read_pool, budget=Budget(),
            staging_dir=self.staging_dir, level=self._store.level,
            pipeline=lambda: ChunkPipeline(self._env, self._store, self._write_pool),
            readahead=Readahead, lock_timeout=lock_timeout)
        self._mutex = threading.Lock()      # the registries below; held only briefly
        self._open: dict[NodeId, OpenFile] = {}
        self._pending: dict[tuple[NodeId, bytes], OpenFile] = {}
        self._hidden: dict[bytes, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._fhs = itertools.count(1)
        self._kernel: OrderedDict[NodeId, bytes | None] = OrderedDict()
        # dir -> (monotonic expiry, subdirectories): counted at most once per NLINK_TTL,
        # kept exact in between by this drive's own mkdir/rmdir/rename
        self._subdirs: dict[NodeId, tuple[float, int]] = {}
        # stat results of committed files nobody has open, valid while no transaction
        # committed (LMDB's txn id) and no open file changed here (_gen)
        self._stat_cache: dict[str | bytes, tuple[int, int, Attr]] = {}
        self._resolved: dict[str | bytes, tuple[int, Node, bytes | None]] = {}
        self._gen = 0

    def close(self) -> None:
        """Commit what open files still hold, and stop the worker threads."""
        for of in {id(h.of): h.of for h in list(self._handles.values())}.values():
            try:
                self._commit(of)
            except CastoreError as exc:
                log.error("could not commit an open file at shutdown: %s", exc)
            except Exception:  # never lose the rest because one failed
                log.exception("could not commit an open file at shutdown")
        self._handles.clear()
        self._read_pool.shutdown(wait=True, cancel_futures=True)
        self._write_pool.shutdown(wait=True, cancel_futures=True)

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _registry(self) -> Iterator[None]:
        if not self._mutex.acquire(timeout=REGISTRY_TIMEOUT):
            raise DeadlineError("the drive's open-file table stayed busy")
        try:
            yield
        finally:
            self._mutex.release()

    def _read_chunk(self, fn: Callable[[LmdbTxn], T], cid: ChunkId) -> T:
        """Run a chunk read; in cluster mode a chunk not held here is fetched first."""
        try:
            return self._env.read(fn)
        except ChunkNotFoundError:
            if self.repo.fetch is None:
                raise
        self.repo.fetch([cid])
        return self._env.read(fn)

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise InvalidNameError(f"no open file with handle {fh}")
        return h

    def _resolve(self, txn: LmdbTxn, path: str | bytes, txn_id: int = 0) -> _Target:
        """What path names. With txn_id (the last commit before txn began), a committed
        node found for this path since then is taken from a cache: walking a path costs a
        lookup and a decode per component, and programs reopen the same paths a lot."""
        if txn_id:
            hit = self._resolved.get(path)
            if hit is not None and hit[0] == txn_id:
                return _Target(hit[1], self._open.get(hit[1].id), hit[2])
        target = self._walk(txn, path)
        if txn_id and target.node is not None:
            if len(self._resolved) > STAT_CACHE:
                self._resolved.clear()
            self._resolved[path] = (txn_id, target.node, target.version)
        return target

    def _walk(self, txn: LmdbTxn, path: str | bytes) -> _Target:
        parts = split_path(path)
        node = self._ns.get(txn, ROOT)
        assert node is not None
        if not parts:
            return _Target(node, None)
        last = parts[-1]
        if _HIDDEN.match(last):
            of = self._hidden.get(last)
            if of is not None:
                return _Target(None, of, name=last)
        for part in parts[:-1]:
            node = self._child_dir(txn, node, part, path)
        if node.kind != Kind.DIR:
            raise NotDirectoryError(f"{os.fsdecode(path)}: a parent is not a directory")
        entry = self._ns.lookup_view(txn, node.id, last)
        if entry is not None:
            child = self._ns.get(txn, entry.node)
            if child is not None:
                return _Target(child, self._open.get(child.id), entry.version, node, last)
        of = self._pending.get((node.id, last))
        if of is not None:
            return _Target(None, of, None, node, last)
        raise PathNotFoundError(f"no such file or directory: {os.fsdecode(path)}")

    def _child_dir(self, txn: LmdbTxn, node: Node, part: bytes, path: str | bytes) -> Node:
        if node.kind != Kind.DIR:
            raise NotDirectoryError(f"{os.fsdecode(path)}: a parent is not a directory")
        entry = self._ns.lookup_view(txn, node.id, part)
        child = self._ns.get(txn, entry.node) if entry is not None else None
        if child is None:
            if (node.id, part) in self._pending:
                raise NotDirectoryError(f"{os.fsdecode(path)}: a parent is not a directory")
            raise PathNotFoundError(f"no such file or directory: {os.fsdecode(path)}")
        if child.kind != Kind.DIR or entry is None or entry.version is not None:
            raise NotDirectoryError(f"{os.fsdecode(path)}: a parent is not a directory")
        return child

    def _parent(self, txn: LmdbTxn, path: str | bytes) -> tuple[Node, bytes]:
        """The directory a new entry goes in, and its name. ExistsError if the name is taken
        (by a committed entry or a file being created)."""
        parts = split_path(path)
        if not parts:
            raise ExistsError("/ exists")
        node = self._ns.get(txn, ROOT)
        assert node is not None
        for part in parts[:-1]:
            node = self._child_dir(txn, node, part, path)
        if node.kind != Kind.DIR:
            raise NotDirectoryError(f"{os.fsdecode(path)}: a parent is not a directory")
        if self._ns.lookup_view(txn, node.id, parts[-1]) is not None or \
                (node.id, parts[-1]) in self._pending:
            raise ExistsError(f"{os.fsdecode(path)} exists")
        return node, parts[-1]

    def _pending_children(self, parent: NodeId) -> list[tuple[bytes, OpenFile]]:
        return [(name, of) for (p, name), of in list(self._pending.items()) if p == parent]

    # -- attributes -----------------------------------------------------------------------
    def getattr(self, path: str | bytes | None, fh: int | None = None) -> Attr:
        """stat. With fh, the open file's own state (fstat)."""
        if fh is not None and (path is None or fh in self._handles):
            h = self._handles.get(fh)
            if h is not None:
                of, nid = h.of, h.of.node
                node = self._env.read(lambda t: self._ns.get(t, nid)) if nid is not None \
                    else None
                return Attr(Kind.FILE, of.mode, of.size, of.mtime_ns, 0 if of.unlinked else 1,
                            *self._owner(node, of.attrs))
        if path is None:
            raise PathNotFoundError("no path and no open file")
        txn_id, gen = self._txn_id(), self._gen
        hit = self._stat_cache.get(path)
        if hit is not None and hit[0] == txn_id and hit[1] == gen:
            return hit[2]

        def run(t: LmdbTxn) -> Attr:
            target = self._resolve(t, path, txn_id)
            attr = self._attr(t, target)
            if target.of is None and target.node is not None and attr.kind != Kind.DIR:
                if len(self._stat_cache) > STAT_CACHE:
                    self._stat_cache.clear()
                self._stat_cache[path] = (txn_id, gen, attr)
            return attr
        return self._env.read(run)

    def _txn_id(self) -> int:
        """The last committed transaction (taken before a read, it dates what it finds)."""
        return int(self._env.env.info()["last_txnid"])

    def _changed(self) -> None:
        """Open-file state changed without a commit: cached stat results are void."""
        self._gen += 1

    def _attr(self, txn: LmdbTxn, target: _Target) -> Attr:
        node, of = target.node, target.of
        if node is None or (of is not None and (of.dirty or of.unlinked)):
            assert of is not None
            owner = node if node is not None else None
            return Attr(Kind.FILE, of.mode, of.size, of.mtime_ns, 0 if of.unlinked else 1,
                        *self._owner(owner, of.attrs))
        if node.kind == Kind.DIR:
            mtime = node.attr_int(b"mtime", self.started_ns if node.id == ROOT else 0)
            return Attr(Kind.DIR, node.attr_int(b"mode", 0o755), 0, mtime,
                        2 + self._subdir_count(txn, node.id), *self._owner(node))
        if node.kind == Kind.SYMLINK:
            target_bytes = node.attr(b"target") or b""
            return Attr(Kind.SYMLINK, 0o777, len(target_bytes), node.attr_int(b"mtime"), 1,
                        *self._owner(node))
        size = 0
        heads = node.heads
        if heads:
            head = heads[-1] if target.version is None else \
                next((h for h in heads if h.key == target.version), heads[-1])
            size = head.size
        return Attr(Kind.FILE, node.attr_int(b"mode", 0o644), size, node.attr_int(b"mtime"), 1,
                    *self._owner(node))

    def _owner(self, node: Node | None, attrs: Attrs | None = None) -> tuple[int, int]:
        uid, gid = self.uid, self.gid
        if node is not None:
            uid, gid = node.attr_int(b"uid", uid), node.attr_int(b"gid", gid)
        if attrs:
            if attrs.get(b"uid") is not None:
                uid = int.from_bytes(attrs[b"uid"] or b"", "little", signed=True)
            if attrs.get(b"gid") is not None:
                gid = int.from_bytes(attrs[b"gid"] or b"", "little", signed=True)
        return uid, gid

    def _subdir_count(self, txn: LmdbTxn, nid: NodeId) -> int:
        """For st_nlink of a directory (2 + subdirectories). Counting scans the directory,
        and with default_permissions the kernel asks for the attributes of a directory
        after each entry made in it, so counts are cached: changes made elsewhere show
        within NLINK_TTL, like every attribute (the kernel caches them as long)."""
        cached = self._subdirs.get(nid)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        count = sum(1 for _, _, kind in self._ns.children(txn, nid) if kind == Kind.DIR)
        if len(self._subdirs) > 10_000:
            self._subdirs.clear()
        self._subdirs[nid] = (now + NLINK_TTL, count)
        return count

    def _subdirs_changed(self, parent: NodeId, delta: int) -> None:
        cached = self._subdirs.get(parent)
        if cached is not None:
            self._subdirs[parent] = (cached[0], max(0, cached[1] + delta))

    def readdir(self, path: str | bytes) -> list[tuple[bytes, Kind]]:
        """The names in a directory as users see them (conflict copies included), with
        files being created here and not committed yet."""
        return [(name, kind) for name, kind, _ in self._listing(path, False)]

    def readdir_attrs(self, path: str | bytes) -> list[tuple[bytes, Attr]]:
        """readdir with each entry's attributes (for READDIRPLUS: the kernel then needs no
        lookup per entry, which is most of the cost of walking a tree)."""
        return [(name, attr) for name, _, attr in self._listing(path, True)
                if attr is not None]

    def _listing(self, path: str | bytes, attrs: bool
                 ) -> list[tuple[bytes, Kind, Attr | None]]:
        def run(t: LmdbTxn) -> list[tuple[bytes, Kind, Attr | None]]:
            target = self._resolve(t, path)
            if target.node is None or target.node.kind != Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(path)} is not a directory")
            out: list[tuple[bytes, Kind, Attr | None]] = []
            for e in self._ns.listing(t, target.node.id):
                attr = None
                if attrs:
                    node = self._ns.get(t, e.node)
                    if node is None:
                        continue
                    attr = self._attr(t, _Target(node, self._open.get(e.node), e.version))
                out.append((e.name, e.kind, attr))
            names = {n for n, _, _ in out}
            for n, of in self._pending_children(target.node.id):
                if n not in names:
                    out.append((n, Kind.FILE, self._attr(t, _Target(None, of))
                                if attrs else None))
            return out
        return self._env.read(run)

    def _set_attrs(self, path: str | bytes, attrs: Attrs,
                   check: Callable[[_Target], None] | None = None) -> None:
        """Apply attributes to a path. A file with uncommitted writes (or not committed
        yet, or unlinked) keeps them with its open state, committed with its content (so
        cp's fchmod/futimens before close cost no commit of their own); otherwise they are
        committed at once."""
        target = self._env.read(lambda t: self._resolve(t, path))
        of = target.of
        if of is not None:
            with of.locked():
                if _overlaid(of):
                    if check is not None:
                        check(target)
                    _apply(of, attrs)
                    self._changed()
                    return

        def run(t: LmdbTxn) -> _Target:
            target = self._resolve(t, path)
            if check is not None:
                check(target)
            if target.node is None:
                raise PathNotFoundError(f"{os.fsdecode(path)} is being created: try again")
            self._ns.set_attrs(t, target.node, attrs)
            return target
        target = self._env.write(run)
        if target.of is not None:
            _apply(target.of, attrs, keep=False)

    def chmod(self, path: str | bytes, mode: int) -> None:
        self._set_attrs(path, {b"mode": int_attr(mode & 0o7777)})

    def chown(self, path: str | bytes, uid: int, gid: int) -> None:
        attrs: Attrs = {}
        if uid >= 0:
            attrs[b"uid"] = int_attr(uid)
        if gid >= 0:
            attrs[b"gid"] = int_attr(gid)
        if attrs:
            self._set_attrs(path, attrs)

    def utimens(self, path: str | bytes, mtime_ns: int | None) -> None:
        """Set the modification time (None: leave it). Access times are not kept."""
        if mtime_ns is not None:
            self._set_attrs(path, {b"mtime": int_attr(mtime_ns)})

    def statfs(self) -> dict[str, int]:
        """The figures of the file system holding the repo."""
        s = os.statvfs(self.repo.config.home)
        return {"f_bsize": s.f_bsize, "f_frsize": s.f_frsize, "f_blocks": s.f_blocks,
                "f_bfree": s.f_bfree, "f_bavail": s.f_bavail, "f_files": s.f_files,
                "f_ffree": s.f_ffree, "f_favail": s.f_favail, "f_namemax": 255}

    # -- extended attributes ----------------------------------------------------------------
    def getxattr(self, path: str | bytes, name: str) -> bytes:
        if not name.startswith("user."):
            raise NoAttributeError(name)
        def run(t: LmdbTxn) -> bytes:
            target = self._resolve(t, path)
            node, of = target.node, target.of
            if name in CASTORE_XATTRS:
                head = self._head(node, target.version)
                if head is None or (node is not None and node.kind != Kind.FILE):
                    raise NoAttributeError(name)
                if name == "user.castore.id":
                    return content_id(head.manifest).encode()
                return str(self._files.chunk_count(t, head.manifest)).encode()
            key = b"x:" + name.encode("utf-8", "surrogateescape")
            if of is not None and _overlaid(of) and key in of.attrs:
                value = of.attrs[key]
            else:
                value = node.attr(key) if node is not None else None
            if value is None:
                raise NoAttributeError(name)
            return bytes(value)
        return self._env.read(run)

    @staticmethod
    def _head(node: Node | None, version: bytes | None) -> Version | None:
        if node is None or not node.heads:
            return None
        if version is None:
            return node.heads[-1]
        return next((h for h in node.heads if h.key == version), None)

    def listxattr(self, path: str | bytes) -> list[str]:
        def run(t: LmdbTxn) -> list[str]:
            target = self._resolve(t, path)
            node, of = target.node, target.of
            names: dict[str, None] = {}
            if node is not None and node.kind == Kind.FILE and node.heads:
                names.update(dict.fromkeys(CASTORE_XATTRS))
            if node is not None:
                for k, (_, v) in node.attrs.items():
                    if k.startswith(b"x:") and v is not None:
                        names[k[2:].decode("utf-8", "surrogateescape")] = None
            if of is not None and _overlaid(of):
                for k, v in of.attrs.items():
                    n = k[2:].decode("utf-8", "surrogateescape")
                    if k.startswith(b"x:"):
                        if v is None:
                            names.pop(n, None)
                        else:
                            names[n] = None
            return list(names)
        return self._env.read(run)

    def setxattr(self, path: str | bytes, name: str, value: bytes, flags: int = 0) -> None:
        self._check_xattr_name(name)
        if len(value) > XATTR_MAX:
            raise AttributeTooLargeError(f"an extended attribute holds at most {XATTR_MAX} "
                                         "bytes")
        key = b"x:" + name.encode("utf-8", "surrogateescape")

        def check(target: _Target) -> None:
            exists = self._has_xattr(target, key)
            if flags & XATTR_CREATE and exists:
                raise ExistsError(f"{name} exists")
            if flags & XATTR_REPLACE and not exists:
                raise NoAttributeError(name)
        self._set_attrs(path, {key: bytes(value)}, check)

    def removexattr(self, path: str | bytes, name: str) -> None:
        self._check_xattr_name(name)
        key = b"x:" + name.encode("utf-8", "surrogateescape")

        def check(target: _Target) -> None:
            if not self._has_xattr(target, key):
                raise NoAttributeError(name)
        self._set_attrs(path, {key: None}, check)

    @staticmethod
    def _check_xattr_name(name: str) -> None:
        if name in CASTORE_XATTRS or name.startswith("user.castore."):
            raise NotPermittedError(f"{name} is maintained by castore and read-only")
        if not name.startswith("user."):
            raise UnsupportedError(f"only user.* extended attributes are kept, not {name}")

    @staticmethod
    def _has_xattr(target: _Target, key: bytes) -> bool:
        of, node = target.of, target.node
        if of is not None and _overlaid(of) and key in of.attrs:
            return of.attrs[key] is not None
        return node is not None and node.attr(key) is not None

    # -- namespace edits ------------------------------------------------------------------
    def mkdir(self, path: str | bytes, mode: int = 0o755) -> None:
        def run(t: LmdbTxn) -> NodeId:
            parent, name = self._parent(t, path)
            self._ns.create(t, parent, name, Kind.DIR, _attrs(mode, time.time_ns()),
                            known_absent=True)
            return parent.id
        self._subdirs_changed(self._env.write(run), +1)

    def symlink(self, path: str | bytes, target: str | bytes) -> None:
        raw = os.fsencode(target)
        if not raw or b"\x00" in raw or len(raw) > 4095:
            raise InvalidNameError("a symlink target is 1 to 4095 bytes without NUL")

        def run(t: LmdbTxn) -> None:
            parent, name = self._parent(t, path)
            self._ns.create(t, parent, name, Kind.SYMLINK,
                            {**_attrs(0o777, time.time_ns()), b"target": raw}, known_absent=True)
        self._env.write(run)

    def readlink(self, path: str | bytes) -> bytes:
        def run(t: LmdbTxn) -> bytes:
            node = self._resolve(t, path).node
            if node is None or node.kind != Kind.SYMLINK:
                raise InvalidNameError(f"{os.fsdecode(path)} is not a symlink")
            return bytes(node.attr(b"target") or b"")
        return self._env.read(run)

    def link(self, target: str | bytes, path: str | bytes) -> None:
        raise NotPermittedError("the drive does not support hard links")

    def mknod(self, path: str | bytes, mode: int) -> None:
        """Only regular files (S_IFREG); devices, FIFOs and sockets are refused (EPERM)."""
        if (mode & 0o170000) not in (0, 0o100000):
            raise NotPermittedError("the drive keeps files, directories and symlinks only")

        def run(t: LmdbTxn) -> None:
            parent, name = self._parent(t, path)
            self._ns.create(t, parent, name, Kind.FILE, _attrs(mode, time.time_ns()),
                            EMPTY_REF, 0, known_absent=True)
        self._env.write(run)

    def rmdir(self, path: str | bytes) -> None:
        def run(t: LmdbTxn) -> NodeId | None:
            node = self._resolve(t, path).node
            if node is None or node.kind != Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(path)} is not a directory")
            if self._pending_children(node.id):
                raise NotEmptyError(f"{os.fsdecode(path)} is not empty")
            parent = node.parent
            self._ns.remove(t, node)
            return parent
        parent = self._env.write(run)
        if parent is not None:
            self._subdirs_changed(parent, -1)

    def unlink(self, path: str | bytes) -> None:
        parts = split_path(path)
        if parts and _HIDDEN.match(parts[-1]):
            with self._registry():
                if self._hidden.pop(parts[-1], None) is not None:
                    return                      # libfuse dropping a hidden name: alias only

        def run(t: LmdbTxn) -> _Target:
            target = self._resolve(t, path)
            node = target.node
            if node is None:
                return target
            if node.kind == Kind.DIR:
                raise IsDirectoryError(f"{os.fsdecode(path)} is a directory")
            if target.version is not None:      # a conflict copy: retire that version
                self._ns.drop_version(t, node, target.version)
            else:
                self._ns.remove(t, node)
            return target
        target = self._env.write(run)
        if target.of is not None and target.version is None:
            self._forget(target.of)

    def _forget(self, of: OpenFile) -> None:
        """An open file left the namespace: its writes are no longer committed."""
        self._changed()
        with self._registry():
            of.unlinked = True
            if of.node is not None and self._open.get(of.node) is of:
                del self._open[of.node]
            if of.parent is not None and self._pending.get((of.parent, of.name)) is of:
                del self._pending[(of.parent, of.name)]

    def rename(self, src: str | bytes, dst: str | bytes, flags: int = 0) -> None:
        """POSIX rename, replacing dst (a directory only if empty). Of the renameat2 flags
        only RENAME_NOREPLACE is supported: others (RENAME_EXCHANGE, RENAME_WHITEOUT) raise
        InvalidNameError (EINVAL) rather than doing a plain rename."""
        if flags & ~RENAME_NOREPLACE:
            raise InvalidNameError(f"rename flags {flags:#x} are not supported")
        dst_parts = split_path(dst)
        if not dst_parts:
            raise InvalidNameError("cannot rename over /")
        if _HIDDEN.match(dst_parts[-1]) and self._hide(src, dst_parts[-1]):
            return
        pending = self._env.read(lambda t: self._resolve(t, src))
        if pending.node is None and pending.of is not None:
            self._commit(pending.of, force=True)     # give it a node, then move that

        def run(t: LmdbTxn) -> None:
            target = self._resolve(t, src)
            node = target.node
            if node is None:
                raise PathNotFoundError(f"no such file or directory: {os.fsdecode(src)}")
            parent_parts, name = dst_parts[:-1], dst_parts[-1]
            parent = self._ns.get(t, ROOT)
            assert parent is not None
            for part in parent_parts:
                parent = self._child_dir(t, parent, part, dst)
            existing = self._ns.lookup_view(t, parent.id, name)
            if flags & RENAME_NOREPLACE and (existing is not None or
                                             (parent.id, name) in self._pending):
                raise ExistsError(f"{os.fsdecode(dst)} exists")
            if existing is not None and existing.kind == Kind.DIR and \
                    self._pending_children(existing.node):
                raise NotEmptyError(f"{os.fsdecode(dst)} is not empty")
            if target.version is not None:      # a conflict copy becomes a file of its own
                if existing is not None:
                    raise ExistsError(f"{os.fsdecode(dst)} exists")
                head = next(h for h in node.heads if h.key == target.version)
                self._ns.create(t, parent, name, Kind.FILE,
                                {k: v for k, (_, v) in node.attrs.items()}, head.manifest,
                                head.size, known_absent=True)
                self._ns.drop_version(t, node, target.version)
                return
            if existing is not None and existing.version is not None:
                raise ExistsError(f"{os.fsdecode(dst)} is a conflict copy")
            if node.kind == Kind.DIR:
                moved.extend(p for p in (node.parent, parent.id) if p is not None)
            self._ns.rename(t, node, parent, name)
        moved: list[NodeId] = []
        self._env.write(run)
        for p in moved:
            self._subdirs.pop(p, None)

    def _hide(self, src: str | bytes, hidden: bytes) -> bool:
        """libfuse hiding a file unlinked (or renamed over) while open. False if src is not
        open here, so the rename is an ordinary one."""
        target = self._env.read(lambda t: self._resolve(t, src))
        of = target.of
        if of is None or of.handles == 0 or target.version is not None:
            return False
        node = target.node
        if node is not None:
            self._env.write(lambda t: self._ns.remove(t, self._ns.get(t, node.id) or node))
        self._forget(of)
        with self._registry():
            self._hidden[hidden] = of
        return True

    # -- open files -----------------------------------------------------------------------
    def create(self, path: str | bytes, mode: int, flags: int = os.O_RDWR) -> Opened:
        """Create and open a file. It enters the namespace at its first commit. An existing
        file is opened instead, unless flags has O_EXCL (ExistsError)."""
        try:
            with self._registry():
                parent, name = self._env.read(lambda t: self._parent(t, path))
                of = OpenFile(self._svc, None, EMPTY, None, EMPTY_REF, mode & 0o7777,
                              time.time_ns(), parent=parent.id, name=name)
                self._pending[(parent.id, name)] = of
                self._changed()
                return self._new_handle(of, flags)
        except ExistsError:
            if flags & os.O_EXCL:
                raise
        return self.open(path, flags)

    def _new_handle(self, of: OpenFile, flags: int) -> Opened:
        fh = next(self._fhs)
        acc = flags & os.O_ACCMODE
        self._handles[fh] = Handle(of, acc in (os.O_WRONLY, os.O_RDWR), bool(flags & os.O_APPEND))
        of.handles += 1
        return Opened(fh, True)

    def open(self, path: str | bytes, flags: int = os.O_RDONLY) -> Opened:
        """Open a file at the newest version known here (sharing the open state of a file
        already open here, unless that one is unchanged and older). Honours O_TRUNC and
        O_APPEND."""
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        txn_id = self._txn_id()
        try:
            opened, of = self._env.read(lambda t: self._open_in(t, path, writable, flags,
                                                                txn_id))
        except ChunkNotFoundError:
            if self.repo.fetch is None:
                raise
            node = self._env.read(lambda t: self._resolve(t, path).node)
            head = node.heads[-1] if node is not None and node.heads else None
            if head is None:
                raise
            self.repo.fetch([ChunkId(bytes(head.manifest[-32:]))])
            opened, of = self._env.read(lambda t: self._open_in(t, path, writable, flags))
        if flags & os.O_TRUNC and writable:
            self._changed()
            try:
                of.truncate(0)
            except BaseException:
                self.release(opened.fh)
                raise
        return opened

    def _open_in(self, txn: LmdbTxn, path: str | bytes, writable: bool, flags: int,
                 txn_id: int = 0) -> tuple[Opened, OpenFile]:
        target = self._resolve(txn, path, txn_id)
        node = target.node
        if node is not None and node.kind == Kind.DIR:
            raise IsDirectoryError(f"{os.fsdecode(path)} is a directory")
        if node is not None and node.kind == Kind.SYMLINK:
            raise InvalidNameError(f"{os.fsdecode(path)} is a symlink")
        if target.version is not None and writable:
            raise NotPermittedError(f"{os.fsdecode(path)} is a conflict copy: copy or rename "
                                    "it to edit it")
        with self._registry():
            of = target.of if target.version is None else None
            if node is not None and target.version is None:
                of = self._open.get(node.id)        # may have changed since the lookup
            head = self._head(node, target.version)
            head_key = head.key if head is not None else None
            if of is None or (not of.dirty and of.node is not None and
                              of.base_key != head_key):
                assert node is not None
                manifest = EMPTY if head is None else \
                    self._files.manifest_for(txn, head.manifest, head.size)
                of = OpenFile(self._svc, node.id, manifest, head_key,
                              bytes(head.manifest) if head is not None else EMPTY_REF,
                              node.attr_int(b"mode", 0o644), node.attr_int(b"mtime"))
                if target.version is None:
                    self._open[node.id] = of
            opened = self._new_handle(of, flags)
            keep = True
            if of.node is not None and not of.dirty:
                keep = self._kernel.get(of.node) == of.base_key
                self._remember(of.node, of.base_key)
            return Opened(opened.fh, keep), of

    def _remember(self, nid: NodeId, key: bytes | None) -> None:
        self._kernel[nid] = key
        self._kernel.move_to_end(nid)
        while len(self._kernel) > KERNEL_VERSIONS:
            self._kernel.popitem(last=False)

    def read(self, fh: int, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        n = self.read_into(fh, offset, memoryview(buf))
        return bytes(buf[:n])

    def read_into(self, fh: int, offset: int, dest: memoryview) -> int:
        """Fill dest from offset; returns the byte count (less only at the end of file)."""
        return self._handle(fh).of.read_into(offset, dest)

    def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        """Write through an open handle; data is only read during the call."""
        h = self._handle(fh)
        self._changed()
        return h.of.write(None if h.append else offset, data)

    def truncate(self, path: str | bytes | None, length: int, fh: int | None = None) -> None:
        if length < 0:
            raise InvalidNameError("a negative length")
        self._changed()
        if fh is not None and fh in self._handles:
            self._handles[fh].of.truncate(length)
            return
        if path is None:
            raise PathNotFoundError("no path and no open file")
        opened = self.open(path, os.O_WRONLY)
        try:
            self._handles[opened.fh].of.truncate(length)
            self.flush(opened.fh)
        finally:
            self.release(opened.fh)

    def flush(self, fh: int) -> None:
        """close() of a descriptor: commit what was written (durable on return)."""
        self._commit(self._handle(fh).of)

    def fsync(self, fh: int) -> None:
        self._commit(self._handle(fh).of)

    def release(self, fh: int) -> None:
        """The last close of a descriptor: commit anything left, drop the state when no
        descriptor uses it any more."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        of = h.of
        try:
            if of.handles <= 1:
                self._commit(of)
        finally:
            with self._registry():
                of.handles -= 1
                last = of.handles <= 0
                if last:
                    if of.node is not None and self._open.get(of.node) is of:
                        del self._open[of.node]
                    if of.parent is not None and self._pending.get((of.parent, of.name)) is of:
                        del self._pending[(of.parent, of.name)]
            if last:
                of.close()

    def _commit(self, of: OpenFile, force: bool = False) -> None:
        with of.locked():
            if of.unlinked:         # nothing to commit; its last release drops the writes
                return
            if not of.dirty and not force:
                return
            built = of.build()
            mtime = of.mtime_ns
            attrs = dict(of.attrs)

            def run(t: LmdbTxn) -> tuple[NodeId, bytes, bytes]:
                for p in built.prepared:
                    self._store.put_encoded_in(t, p.cid, p.raw_len, p.codec, p.stored)
                ref = self._files.put_content_in(t, built.manifest)
                size = built.manifest.size
                if of.node is None:
                    assert of.parent is not None
                    return self._commit_new(t, of, ref, size, mtime)
                node = self._ns.get(t, of.node)
                if node is None:
                    raise PathNotFoundError("the file was removed while it was open")
                parents = (of.base_key,) if of.base_key else None
                key = self._ns.set_content(t, node, ref, size,
                                           {**attrs, b"mtime": int_attr(mtime)}, parents)
                return node.id, key, ref
            nid, key, ref = self._env.write(run)
            was_pending = of.node is None
            of.committed(built.manifest, key, ref, nid)
        with self._registry():
            if was_pending:
                if self._pending.get((of.parent, of.name)) is of:  # type: ignore[arg-type]
                    del self._pending[(of.parent, of.name)]  # type: ignore[arg-type]
                self._open.setdefault(nid, of)
            self._remember(nid, key)

    def _commit_new(self, t: LmdbTxn, of: OpenFile, ref: bytes, size: int, mtime: int
                    ) -> tuple[NodeId, bytes, bytes]:
        parent = self._ns.get(t, of.parent)  # type: ignore[arg-type]
        if parent is None or parent.kind != Kind.DIR:
            raise PathNotFoundError("the directory of a new file went away")
        attrs: Attrs = {**of.attrs, **_attrs(of.mode, mtime)}
        existing = self._ns.lookup(t, parent.id, of.name)
        if existing is not None:            # made meanwhile elsewhere: a new version of it
            node = self._ns.get(t, existing)
            if node is None or node.kind != Kind.FILE:
                raise ExistsError(f"{os.fsdecode(of.name)} was created meanwhile by another "
                                  "peer")
            key = self._ns.set_content(t, node, ref, size, attrs)
            return node.id, key, ref
        node = self._ns.create(t, parent, of.name, Kind.FILE, attrs, ref, size,
                               known_absent=True)
        assert node.head is not None
        return node.id, node.head.key, ref


class _StoreSource:
    """The ChunkSource of open files: chunks from the repo's store, each verified on its
    first read (BLAKE3), uncompressed ones copied straight out of the store's map."""

    def __init__(self, vfs: Vfs) -> None:
        self._vfs = vfs
        self._store = vfs._store

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
        return self._vfs._read_chunk(run, cid)

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
        return self._vfs._read_chunk(run, cid)


def _overlaid(of: OpenFile) -> bool:
    """Attributes of this open file are kept with it, not committed on their own."""
    return of.node is None or of.unlinked or of.dirty


def _apply(of: OpenFile, attrs: Attrs, keep: bool = True) -> None:
    """Reflect attributes in an open file's state (and keep them for its commit)."""
    mode, mtime = attrs.get(b"mode"), attrs.get(b"mtime")
    if mode is not None:
        of.mode = int.from_bytes(mode, "little", signed=True)
    if mtime is not None:
        of.mtime_ns = int.from_bytes(mtime, "little", signed=True)
    if keep:
        of.attrs.update(attrs)


def _attrs(mode: int, mtime_ns: int) -> Attrs:
    return {b"mode": int_attr(mode & 0o7777), b"mtime": int_attr(mtime_ns)}


__all__ = ["Attr", "AttributeTooLargeError", "NoAttributeError", "NotPermittedError",
           "Opened", "UnsupportedError", "Vfs"]
