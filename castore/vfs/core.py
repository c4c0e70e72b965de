"""The core of the drive's file system: the state shared by every operation (open-file
registries, caches, worker pools), path resolution through the namespace and the files being
created here, and attributes (stat, readdir, chmod, chown, utimens, statfs). The operations
on files, the tree and xattrs build on it (handles.py, edits.py, xattrs.py; Vfs in fs.py).
Imports no FUSE code.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from castore.errors import (CastoreError, ChunkNotFoundError, ExistsError, InvalidNameError,
                            NotDirectoryError, PathNotFoundError)
from castore.files import ChunkPipeline
from castore.ids import ROOT, ChunkId, NodeId
from castore.ops import Attrs, Kind, Node, int_attr, split_path
from castore.repo import Repo
from castore.store.lmdb import LmdbTxn
from castore.store.readahead import Readahead
from castore.journal import Intent
from castore.vfs.committer import AttrChange, Closing, Committer, drive_write
from castore.vfs.openfile import FileServices, Held, OpenFile
from castore.vfs.readcache import Budget, DeadlineError
from castore.vfs.source import StoreSource
from castore.vfs.types import (HIDDEN, AccessDeniedError, Attr, Handle, Target, apply_attrs,
                               overlaid)

T = TypeVar("T")
log = logging.getLogger(__name__)

REGISTRY_TIMEOUT = 10.0
NLINK_TTL = 1.0                 # seconds a directory's subdirectory count is cached
STAT_CACHE = 100_000            # stat results cached at most
LISTED = 200_000                # entries of directory listings cached at most, together
LISTING_MAX = 10_000            # entries of a listing worth caching at most
WALK_FILES = 16                 # files first read within WALK_SECONDS: a walk of the tree
WALK_SECONDS = 1.0
HIDDEN_GRACE = 1.0              # seconds a hidden name libfuse dropped still opens its file
RENAMED_QUIET = 1.0             # seconds after a rename here before a file is handed over


class VfsCore:
    """State and lookups shared by Vfs's operations (see castore.vfs.fs.Vfs). The registries
    of open files change under _registry() only; caches are validated, never trusted."""

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
        source = self._source = StoreSource(self._store, self._read_chunk)
        self._svc = FileServices(
            source=source, read_pool=self._read_pool,
            budget=Budget(),
            staging_dir=self.staging_dir,
            pipeline=lambda: ChunkPipeline(self._env, self._store, self._write_pool),
            readahead=Readahead.for_file, lock_timeout=lock_timeout)
        self._mutex = threading.Lock()      # the registries below; held only briefly
        self._open: dict[NodeId, OpenFile] = {}
        self._pending: dict[tuple[NodeId, bytes], OpenFile] = {}
        self._hidden: dict[bytes, OpenFile] = {}
        self._hidden_gone: dict[bytes, float] = {}  # names libfuse dropped -> alias ends
        self._handles: dict[int, Handle] = {}
        # light handles (types.Light) by node, then handle number; registry held
        self._light: dict[NodeId, dict[int, Handle]] = {}
        self._fhs = itertools.count(1)
        self._kernel: OrderedDict[NodeId, bytes | None] = OrderedDict()
        # versions written here around the page cache: the kernel may hold none of them
        self._unfilled: OrderedDict[NodeId, bytes] = OrderedDict()
        # dir -> (monotonic expiry, subdirectories, the snapshot counted in or -1): counted
        # at most once per NLINK_TTL, kept exact in between by this drive's own
        # mkdir/rmdir/rename
        self._subdirs: dict[NodeId, tuple[float, int, int]] = {}
        # stat results of committed files nobody has open, valid while no transaction
        # committed (LMDB's txn id) and no open file changed here (_gen)
        self._stat_cache: dict[str | bytes, tuple[int, int, Attr]] = {}
        self._resolved: dict[str | bytes, tuple[int, Node, bytes | None]] = {}
        # listings with attributes, valid under the same rule as _stat_cache; _listed: the
        # entries they hold together
        self._listed = 0
        self._listings_mutex = threading.Lock()     # their updates (lookups take none)
        self._listings: dict[str | bytes, tuple[int, int, list[tuple[bytes, Kind,
                                                                 Attr | None]]]] = {}
        self._gen = 0
        # attribute changes of committed nodes in the close journal, not committed yet:
        # node -> (changes queued, the attributes they set); shown by _overlay
        self._attrs_pending: dict[NodeId, tuple[int, Attrs]] = {}
        self._attrs_order = threading.Lock()    # journal order = the order they show in
        self._attrs_mutex = threading.Lock()    # _attrs_pending; held only briefly
        self._committer = Committer(repo, self._landed)
        self._first_reads: deque[float] = deque(maxlen=WALK_FILES)
        # renames through the drive under way, and when the last one ended (see _renaming)
        self._renames = 0
        self._renamed_at = -RENAMED_QUIET
        self._renames_mutex = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------
    def _landed(self, closing: Closing) -> None:
        raise NotImplementedError                    # FileHandleOps

    def _write(self, fn: Callable[[LmdbTxn], T]) -> T:
        """A commit of a change made through the drive (see drive_write)."""
        return drive_write(self._env, fn)

    def _stable(self, fn: Callable[[LmdbTxn], T]) -> T:
        """fn(txn): a read of a store snapshot and of the open files together, run again on
        a newer snapshot when the open files may already show a commit the snapshot
        predates (Committer.landing). Never waits for a commit in progress."""
        for _ in range(20):
            snap = 0

            def run(t: LmdbTxn) -> T:
                nonlocal snap
                snap = t.txn_id()
                return fn(t)
            try:
                out = self._env.read(run)
            except CastoreError:
                if self._committer.landing_txn <= snap:
                    raise
                continue
            if self._committer.landing_txn <= snap:
                return out
        self.settle()
        return self._env.read(fn)

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until every close is committed: before changes to the tree, which must see
        the files closed before them."""
        if self._committer.busy and not self._committer.drain(timeout):
            raise DeadlineError("closed files were not committed in time")

    def _registry(self) -> Held:
        """The registries' lock, for a with block."""
        if not self._mutex.acquire(timeout=REGISTRY_TIMEOUT):
            raise DeadlineError("the drive's open-file table stayed busy")
        return Held(self._mutex)

    def _read_chunk(self, fn: Callable[[LmdbTxn], T], cid: ChunkId) -> T:
        """Run a chunk read; in cluster mode a chunk not held here is fetched first."""
        try:
            return self._env.read(fn)
        except ChunkNotFoundError:
            if self.repo.fetch is None:
                raise
        self.repo.fetch([cid])
        return self._env.read(fn)

    def mounted(self) -> None:
        """The drive was just mounted: a store small against memory is asked for whole at
        once (LmdbEnv.prewarm), in the background. borg's mount reads its archive's metadata
        before the mount appears; this makes no one wait, and the first walk of the drive
        finds its directories, nodes and small files in memory."""
        self._env.prewarm()

    def _first_read(self) -> None:
        """An open file's first read. Many in a short time are a walk (tar c, cp -r, rsync,
        grep -r), which on a cold store would wait on the disk one page fault at a time: a
        small store is then asked for whole (LmdbEnv.prewarm)."""
        now = time.monotonic()
        reads = self._first_reads
        reads.append(now)
        if len(reads) == WALK_FILES and now - reads[0] <= WALK_SECONDS:
            self._env.prewarm()

    @contextmanager
    def _renaming(self) -> Iterator[None]:
        """Around a rename through the drive. The kernel moves its own entry for the name
        only once the reply reached it, so for a moment after a rename the kernel still maps
        the new name to the file it replaced: a file handed to the kernel by path (whole())
        could land in the wrong one then. None is handed over while a rename is under way
        or ended less than RENAMED_QUIET ago."""
        with self._renames_mutex:
            self._renames += 1
        try:
            yield
        finally:
            with self._renames_mutex:
                self._renames -= 1
                self._renamed_at = time.monotonic()

    def _names_settled(self) -> bool:
        return not self._renames and time.monotonic() - self._renamed_at >= RENAMED_QUIET

    def _handle(self, fh: int) -> Handle:
        """The handle fh, with its open state (made now for a light handle)."""
        h = self._handles.get(fh)
        if h is None:
            raise InvalidNameError(f"no open file with handle {fh}")
        if h.of is None:
            self._materialize(h)
        return h

    def _state(self, fh: int) -> OpenFile:
        """The open state of handle fh."""
        of = self._handle(fh).of
        assert of is not None
        return of

    def _materialize(self, h: Handle) -> None:
        """Give a light handle its open state (FileHandleOps)."""
        raise NotImplementedError

    def _resolve(self, txn: LmdbTxn, path: str | bytes, txn_id: int = 0,
                 missing_ok: bool = False) -> Target:
        """What path names. With txn_id (the last commit before txn began), a committed
        node found for this path since then is taken from a cache: walking a path costs a
        lookup and a decode per component, and programs reopen the same paths a lot. With
        missing_ok, a missing last component gives a Target with neither node nor open file
        instead of PathNotFoundError."""
        if txn_id:
            hit = self._resolved.get(path)
            if hit is not None and hit[0] == txn_id:
                return Target(hit[1], self._open.get(hit[1].id), hit[2])
        target = self._walk(txn, path, txn_id, missing_ok)
        if txn_id and target.node is not None:
            if len(self._resolved) > STAT_CACHE:
                self._resolved.clear()
            self._resolved[path] = (txn_id, target.node, target.version)
        return target

    def _walk(self, txn: LmdbTxn, path: str | bytes, txn_id: int = 0,
              missing_ok: bool = False) -> Target:
        parts = split_path(path)
        if not parts:
            node = self._ns.get(txn, ROOT)
            assert node is not None
            return Target(node, None)
        last = parts[-1]
        if HIDDEN.match(last):
            of = self._hidden.get(last)
            until = self._hidden_gone.get(last)
            if of is not None and (until is None or until > time.monotonic()):
                return Target(None, of, name=last)
        node = self._dir_at(txn, parts[:-1], path, txn_id)
        entry = self._ns.lookup_view(txn, node.id, last)
        if entry is not None:
            child = self._ns.get(txn, entry.node)
            if child is not None:
                return Target(child, self._open.get(child.id), entry.version, node, last)
        of = self._pending.get((node.id, last))
        if of is not None:
            return Target(None, of, None, node, last)
        if missing_ok:
            return Target(None, None, None, node, last)
        raise PathNotFoundError(f"no such file or directory: {os.fsdecode(path)}")

    def _dir_at(self, txn: LmdbTxn, parts: list[bytes], path: str | bytes,
                txn_id: int = 0) -> Node:
        """The directory named by parts (the parents of path). With txn_id (the snapshot's),
        a directory found in this snapshot before comes from the cache of _resolve: the
        files of one directory share their parents, and walking them again costs a lookup
        and a decode per component."""
        key = b"/".join(parts)
        if txn_id:
            hit = self._resolved.get(key)
            if hit is not None and hit[0] == txn_id:
                return hit[1]
        node = self._ns.get(txn, ROOT)
        assert node is not None
        for part in parts:
            node = self._child_dir(txn, node, part, path)
        if node.kind != Kind.DIR:
            raise NotDirectoryError(f"{os.fsdecode(path)}: a parent is not a directory")
        if txn_id:
            if len(self._resolved) > STAT_CACHE:
                self._resolved.clear()
            self._resolved[key] = (txn_id, node, None)
        return node

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

    def _parent(self, txn: LmdbTxn, path: str | bytes, read_only: bool = False
                ) -> tuple[Node, bytes]:
        """The directory a new entry goes in, and its name. ExistsError if the name is taken
        (by a committed entry or a file being created). read_only: txn is a read
        transaction, whose snapshot can date the cached directories of _dir_at (a write
        transaction's id is not final until it commits)."""
        parts = split_path(path)
        if not parts:
            raise ExistsError("/ exists")
        node = self._dir_at(txn, parts[:-1], path, txn.txn_id() if read_only else 0)
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
                if h.of is None:
                    self._materialize(h)
                of = h.of
                assert of is not None
                nid = of.node
                node = self._overlay(self._env.read(lambda t: self._ns.get(t, nid))) \
                    if nid is not None else None
                return Attr(Kind.FILE, of.mode, of.size, of.mtime_ns, 0 if of.unlinked else 1,
                            *self._owner(node, of.attrs))
        if path is None:
            raise PathNotFoundError("no path and no open file")
        attr = self._path_attr(path, False)
        assert attr is not None
        return attr

    def lookup(self, path: str | bytes) -> Attr | None:
        """getattr of a path, or None when its last component does not exist. The kernel
        looks up each name a program creates before creating it, so a missing name is a
        common answer: it comes without an exception. A missing directory on the way still
        raises PathNotFoundError (NotDirectoryError for a file there)."""
        return self._path_attr(path, True)

    def _path_attr(self, path: str | bytes, missing_ok: bool) -> Attr | None:
        gen = self._gen
        hit = self._stat_cache.get(path)
        if hit is not None and hit[1] == gen and hit[0] == self._txn_id():
            return hit[2]

        def run(t: LmdbTxn) -> Attr | None:
            txn_id = t.txn_id()
            target = self._resolve(t, path, txn_id, missing_ok)
            if target.node is None and target.of is None:
                return None         # read again if a close landed meanwhile (_stable)
            attr = self._attr(t, target)
            if target.of is None and target.node is not None and \
                    self._current(attr, target.node.id, txn_id):
                if len(self._stat_cache) > STAT_CACHE:
                    self._stat_cache.clear()
                self._stat_cache[path] = (txn_id, gen, attr)
            return attr
        return self._stable(run)

    def _known_path(self, path: str | bytes, txn_id: int, gen: int, node: Node,
                    version: bytes | None, attr: Attr) -> None:
        """Remember what a listing found at path, for the requests that follow it: a program
        walking a tree opens and stats each entry it just listed."""
        if len(self._resolved) > STAT_CACHE:
            self._resolved.clear()
        self._resolved[path] = (txn_id, node, version)
        if not self._current(attr, node.id, txn_id):
            return
        if len(self._stat_cache) > STAT_CACHE:
            self._stat_cache.clear()
        self._stat_cache[path] = (txn_id, gen, attr)

    def access(self, path: str | bytes, execute: bool) -> None:
        """access(2) where the kernel leaves permissions to the drive (a mount only root can
        use), with root's rules: read and write anything, run a file only if one of its x
        bits is set (AccessDeniedError otherwise)."""
        if execute:
            a = self.getattr(path)
            if a.kind == Kind.FILE and not a.mode & 0o111:
                raise AccessDeniedError(f"{os.fsdecode(path)} has no x bit")

    def _txn_id(self) -> int:
        """The last committed transaction (taken before a read, it dates what it finds)."""
        return int(self._env.env.info()["last_txnid"])

    def _changed(self) -> None:
        """Open-file state changed without a commit: cached stat results are void."""
        self._gen += 1

    def _overlay(self, node: Node | None) -> Node | None:
        """node with the attribute changes still on their way to the store applied (a copy:
        nodes read from the store are shared)."""
        if node is None or not self._attrs_pending:
            return node
        pending = self._attrs_pending.get(node.id)
        if pending is None:
            return node
        attrs = dict(node.attrs)
        attrs.update((k, (b"", v)) for k, v in pending[1].items())
        return Node(node.id, node.kind, node.parent, node.name, node.move_key, attrs,
                    node.heads)

    def _attrs_landed(self, nid: NodeId | None) -> None:
        """A journaled attribute change of nid is committed (or failed; None: a change of a
        file whose create failed)."""
        if nid is None:
            return
        with self._attrs_mutex:
            count, attrs = self._attrs_pending.get(nid, (1, {}))
            if count <= 1:
                self._attrs_pending.pop(nid, None)
            else:
                self._attrs_pending[nid] = (count - 1, attrs)
            self._changed()

    def _attr(self, txn: LmdbTxn, target: Target) -> Attr:
        node, of = self._overlay(target.node), target.of
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
        self._subdirs[nid] = (now + NLINK_TTL, count, txn.txn_id())
        return count

    def _current(self, attr: Attr, nid: NodeId, txn_id: int) -> bool:
        """Whether attr may be cached until the next commit: a directory's only when its
        subdirectory count was taken in this snapshot (an older count, which may miss
        changes made elsewhere, is good for NLINK_TTL only)."""
        if attr.kind != Kind.DIR:
            return True
        cached = self._subdirs.get(nid)
        return cached is not None and cached[2] == txn_id

    def _subdirs_changed(self, parent: NodeId, delta: int) -> None:
        cached = self._subdirs.get(parent)
        if cached is not None:
            self._subdirs[parent] = (cached[0], max(0, cached[1] + delta), -1)

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
        self.settle()           # a listing shows what closes before it did (conflict copies)
        gen = self._gen
        if attrs:               # a walk's second pass lists nothing anew
            hit = self._listings.get(path)
            if hit is not None and hit[1] == gen and hit[0] == self._txn_id():
                return hit[2]
        snap = 0
        current = True

        def run(t: LmdbTxn) -> list[tuple[bytes, Kind, Attr | None]]:
            nonlocal snap, current
            current = True
            txn_id = snap = t.txn_id()
            target = self._resolve(t, path, txn_id)
            if target.node is None or target.node.kind != Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(path)} is not a directory")
            out: list[tuple[bytes, Kind, Attr | None]] = []
            child = _child_path(path)
            for e in self._ns.listing(t, target.node.id):
                attr = None
                if attrs:
                    node = self._ns.get(t, e.node)
                    if node is None:
                        continue
                    of = self._open.get(e.node)
                    attr = self._attr(t, Target(node, of, e.version))
                    current = current and self._current(attr, node.id, txn_id)
                    if of is None:
                        self._known_path(child(e.name), txn_id, gen, node, e.version, attr)
                out.append((e.name, e.kind, attr))
            names = {n for n, _, _ in out}
            for n, of in self._pending_children(target.node.id):
                if n not in names:
                    out.append((n, Kind.FILE, self._attr(t, Target(None, of))
                                if attrs else None))
            return out
        listing = self._stable(run)
        if attrs and current and len(listing) <= LISTING_MAX:
            with self._listings_mutex:
                old = self._listings.pop(path, None)
                self._listed -= len(old[2]) if old is not None else 0
                if self._listed + len(listing) > LISTED:
                    self._listings.clear()
                    self._listed = 0
                self._listings[path] = (snap, gen, listing)
                self._listed += len(listing)
        return listing

    def _set_attrs(self, path: str | bytes, attrs: Attrs,
                   check: Callable[[Target], None] | None = None) -> None:
        """Apply attributes to a path. A file with uncommitted writes (or not committed
        yet, or unlinked) keeps them with its open state, committed with its content (so
        cp's fchmod/futimens before close cost no commit of their own). Otherwise the
        change goes to the close journal like a close (it survives the daemon being
        killed), shows here at once, and is committed with the next group: tar x sets the
        times, owner and mode of every directory after filling it. A file whose close is
        still landing (writes to it wait for that) does not wait either: the change is
        journaled after the close and lands after it (rsync sets the times and mode of
        each file it wrote after closing it); a new one is named by its name
        (_attrs_ahead)."""
        target = self._stable(lambda t: self._resolve(t, path))
        of = target.of
        landing = of is not None and of.inflight is not None and not of.unlinked
        if landing and of is not None and of.node is None and \
                self._attrs_ahead(of, target, attrs, check):
            return
        if of is not None and not (landing and of.node is not None):
            with of.settled():
                if overlaid(of):
                    if check is not None:
                        check(target)
                    apply_attrs(of, attrs)
                    self._changed()
                    return
        with self._attrs_order:
            target = self._stable(lambda t: self._resolve(t, path))
            if target.node is None:
                raise PathNotFoundError(f"{os.fsdecode(path)} is being created: try again")
            if check is not None:
                check(Target(self._overlay(target.node), target.of, target.version,
                             target.parent, target.name))
            nid, node = target.node.id, target.node
            with self._attrs_mutex:         # shown before it can land
                count, pending = self._attrs_pending.get(nid, (0, {}))
                self._attrs_pending[nid] = (count + 1, {**pending, **attrs})
            self._changed()
            try:
                self._committer.submit(Intent.of_attrs(nid, attrs), AttrChange(nid))
            except CastoreError as exc:     # e.g. disk full: commit now, and say so
                log.info("committing an attribute change directly: %s", exc)
                try:
                    self._write(lambda t: self._ns.set_attrs(
                        t, self._ns.get(t, nid) or node, attrs))
                finally:
                    self._attrs_landed(nid)
        if target.of is not None:
            apply_attrs(target.of, attrs, keep=False)

    def _attrs_ahead(self, of: OpenFile, target: Target, attrs: Attrs,
                     check: Callable[[Target], None] | None) -> bool:
        """A change of attributes of a file created here whose close is still landing:
        journaled by its name (Intent.of_attrs_at), shown by its open state until the
        create lands and then by the overlay (FileHandleOps._ahead_landed). False if the
        create landed meanwhile (the caller journals it by node) or the journal refused it
        (the caller waits for the landing)."""
        with self._attrs_order:
            with of.locked():
                if of.inflight is None or of.node is not None or of.parent is None:
                    return False
                if check is not None:
                    check(target)
                owner = AttrChange(None, dict(attrs))
                try:
                    self._committer.submit(Intent.of_attrs_at(of.parent, of.name, attrs),
                                           owner)
                except CastoreError:        # e.g. disk full: once it landed, as before
                    return False
                of.attrs_ahead.append(owner)
                apply_attrs(of, attrs)
        self._changed()
        return True

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


def _child_path(path: str | bytes) -> Callable[[bytes], str | bytes]:
    """name -> the path of that entry of directory path, spelled as the drive's callers spell
    paths (str paths decode names as UTF-8 with surrogate escapes, like the FUSE adapter)."""
    if isinstance(path, bytes):
        base = path.rstrip(b"/") + b"/"
        return lambda name: base + name
    prefix = path.rstrip("/") + "/"
    return lambda name: prefix + name.decode("utf-8", "surrogateescape")
