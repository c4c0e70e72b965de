"""The repository: one peer's store, files and namespace behind one facade.

This is the API the gRPC servicer adapts and the offline CLI calls directly, so both behave
the same. A file commit (chunks, manifest, reference counts, tree ops) is one LMDB
transaction; many small files share one transaction, and every result is reported only after
its transaction is durable.
"""
from __future__ import annotations

import logging
import os
import stat as st
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from castore import chunking, journal
from castore.config import Config
from castore.errors import (CastoreError, ChunkNotFoundError, ExistsError, IntegrityError,
                            IsDirectoryError, NotDirectoryError, RepoError,
                            StorageFullError, UsageError)
from castore.files import EMPTY, ChunkPipeline, Files, Manifest, Prepared, content_id, prepare
from castore.hlc import HybridClock
from castore.journal import Intent, Journal
from castore.ids import ROOT, TRASH, ChunkId, NodeId
from castore.namespace import CONFLICT_TAG, Namespace
from castore.ops import Kind, Node, Op, check_name, int_attr, key_ts, split_path
from castore.results import AddResult, Entry, IngestItem, VerifyReport
from castore.store.lmdb import LmdbEnv, LmdbStore, LmdbTxn, read_counters

log = logging.getLogger(__name__)

BATCH_FILES = 2000              # small files per commit
BATCH_BYTES = 32 << 20          # or this many bytes
BATCH_SECONDS = 0.25            # or this long since the first pending file
SMALL_FILE = 4 << 20            # up to this size a file is read whole; above, mmapped


NAMESPACE_TABLES = ("ops", "opseq", "nodes", "dirents", "superseded", "revived", "meta")
KIND_NAMES = {Kind.FILE: "file", Kind.DIR: "dir", Kind.SYMLINK: "symlink",
              Kind.UNKNOWN: "unknown"}


class Repo:
    """One peer's repository. Thread-safe; open it once per process."""

    def __init__(self, config: Config, env: LmdbEnv) -> None:
        self.config = config
        self.env = env
        self.store = LmdbStore(env, level=config.compression_level)
        self.files = Files(self.store)
        self.replica = env.read(lambda t: bytes(t.get("meta", b"replica") or b""))
        if len(self.replica) != 16:
            raise RepoError(f"{config.home} is not an initialized castore repo")
        last = env.read(lambda t: self._last_ts(t))
        self.ns = Namespace(self.replica, HybridClock(last), self.files.retain,
                            self.files.release)
        self.pool = ThreadPoolExecutor(3, thread_name_prefix="castore-ingest")
        self._closed = False
        # cluster mode (set by the daemon): make missing chunks/manifests local, or raise
        # ChunkNotFoundError; and wait until content is on W peers
        self.fetch: Callable[[list[ChunkId]], None] | None = None
        self.durability: Callable[[list[str], float], tuple[bool, int, int]] | None = None
        self._journal: Journal | None = None
        if config.journal_path.exists():
            self._replay_journal()

    def _last_ts(self, txn: LmdbTxn) -> int:
        for k, _ in txn.scan("ops", reverse=True):
            return key_ts(bytes(k))
        return 0

    # -- lifecycle ------------------------------------------------------------------------
    @classmethod
    def init(cls, config: Config) -> Repo:
        config.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = LmdbEnv(config.store_path, map_size=config.map_size)

        def setup(t: LmdbTxn) -> bool:
            if t.get("meta", b"replica") is not None:
                return False
            t.put("meta", b"replica", os.urandom(16))
            t.put("meta", b"created", int_attr(time.time_ns()))
            return True
        env.write(setup)
        return cls(config, env)

    @classmethod
    def open(cls, config: Config) -> Repo:
        if not (config.store_path / "data.mdb").exists():
            raise RepoError(f"no castore repo at {config.home} (run 'castore init')")
        return cls(config, LmdbEnv(config.store_path, map_size=config.map_size))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.pool.shutdown(wait=True)
            if self._journal is not None:
                self._journal.close()
            self.env.close()

    def close_journal(self) -> Journal:
        """The journal of files closed on the drive and not committed yet (castore.journal)."""
        if self._journal is None:
            self._journal = Journal(self.config.journal_path)
        return self._journal

    def _replay_journal(self) -> None:
        """Commit the closes a killed process left in the journal, then empty it."""
        jnl = self.close_journal()
        if jnl.empty:
            return
        gen, done = self.env.read(journal.applied)
        count = 0
        for end, intent in jnl.records():
            if gen == jnl.generation and end <= done:
                continue

            def run(t: LmdbTxn, intent: Intent = intent, end: int = end) -> None:
                journal.apply(t, self.ns, self.files, self.store, intent)
                journal.mark_applied(t, jnl.generation, end)
            try:
                self.env.write(run)
                count += 1
            except StorageFullError:
                raise
            except CastoreError as exc:
                log.warning("a file closed before the last stop could not be committed: %s",
                            exc)
        if count:
            log.info("committed %d closed file(s) from the close journal", count)
        jnl.reset()

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------
    def _entry(self, txn: LmdbTxn, node: Node, path: str, version: bytes | None = None
               ) -> Entry:
        head = node.head if version is None else \
            next((h for h in node.heads if h.key == version), node.head)
        chunks = self.files.chunk_count(txn, head.manifest) if head is not None else 0
        xattrs = {k[2:].decode(errors="surrogateescape"): v for k, (_, v) in node.attrs.items()
                  if k.startswith(b"x:") and v is not None}
        default_mode = 0o755 if node.kind == Kind.DIR else 0o644
        return Entry(path=path, name=path.rsplit("/", 1)[-1] if node.id != ROOT else "/",
                     kind=KIND_NAMES[node.kind], size=head.size if head else 0,
                     mode=node.attr_int(b"mode", default_mode), mtime_ns=node.attr_int(b"mtime"),
                     content=content_id(head.manifest) if head else "", chunks=chunks,
                     versions=len(node.heads), target=os.fsdecode(node.attr(b"target") or b""),
                     node=node.id.raw.hex(), xattrs=xattrs)

    def stat(self, path: str) -> Entry:
        def run(t: LmdbTxn) -> Entry:
            node, version = self.ns.resolve_view(t, path)
            return self._entry(t, node, _norm(path), version)
        return self.env.read(run)

    def listdir(self, path: str = "/") -> list[Entry]:
        """The entries of a directory as users see them, conflict copies included."""
        def run(t: LmdbTxn) -> list[Entry]:
            node, version = self.ns.resolve_view(t, path)
            base = _norm(path)
            if node.kind != Kind.DIR:
                return [self._entry(t, node, base, version)]
            out = []
            for e in self.ns.listing(t, node.id):
                child = self.ns.get(t, e.node)
                if child is not None:
                    out.append(self._entry(t, child, _join(base, os.fsdecode(e.name)), e.version))
            return out
        return self.env.read(run)

    def manifest_of(self, target: str) -> Manifest:
        """The manifest of a path's current version, or of a content id."""
        def run(t: LmdbTxn) -> Manifest:
            if _looks_like_id(target):
                return self.files.load_by_id(t, ChunkId.from_hex(target))
            node, version = self.ns.resolve_view(t, target)
            if node.kind == Kind.DIR:
                raise IsDirectoryError(f"{target} is a directory")
            head = node.head if version is None else \
                next((h for h in node.heads if h.key == version), None)
            if head is None:
                return EMPTY
            return self.files.manifest_for(t, head.manifest, head.size)
        try:
            return self.env.read(run)
        except ChunkNotFoundError:
            if self.fetch is None:
                raise
        if _looks_like_id(target):
            self.fetch([ChunkId.from_hex(target)])     # read through: a manifest or a chunk
        else:                                          # a path whose manifest is elsewhere
            ref = self.env.read(lambda t: self._head_ref(t, target))
            if len(ref) != 32:
                raise ChunkNotFoundError(f"the content of {target} is not in the local store")
            self.fetch([ChunkId(ref)])
        return self.env.read(run)

    def _head_ref(self, txn: LmdbTxn, target: str) -> bytes:
        node, version = self.ns.resolve_view(txn, target)
        head = node.head if version is None else \
            next((h for h in node.heads if h.key == version), None)
        return bytes(head.manifest) if head is not None else b""

    def read(self, target: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream the bytes of a path or content id, each chunk verified on the way out."""
        if offset < 0 or (length is not None and length < 0):
            raise UsageError("offset and length must not be negative")
        manifest = self.manifest_of(target)
        if self.fetch is not None:
            return self._read_through(manifest, offset, length)
        return self.files.iter_range(self.env, manifest, offset, length)

    def _read_through(self, manifest: Manifest, offset: int, length: int | None
                      ) -> Iterator[bytes]:
        """iter_range, fetching the chunks not held here from peers, a window ahead."""
        assert self.fetch is not None
        end = manifest.size if length is None else min(manifest.size, offset + length)
        first, last = manifest.locate(offset), manifest.locate(max(offset, end - 1)) + 1
        window = 16
        for i in range(first, min(last, len(manifest.chunks)), window):
            ids = list(manifest.chunks[i:i + window])
            missing = self.env.read(lambda t: [c for c in ids if not self.store.has_in(t, c)])
            if missing:
                self.fetch(missing)
            lo = max(offset, manifest.offsets[i])
            hi = min(end, manifest.offsets[min(i + window, len(manifest.chunks))])
            yield from self.files.iter_range(self.env, manifest, lo, hi - lo)

    def wait_durable(self, contents: list[str], timeout: float) -> tuple[bool, int, int]:
        """Wait until the content ids are on W peers: (durable, W, fewest copies). Without a
        cluster the local commit is all there is (W = 1)."""
        if self.durability is None:
            return True, 1, 1
        return self.durability(contents, timeout)

    # -- namespace edits ------------------------------------------------------------------
    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> Entry:
        def run(t: LmdbTxn) -> Entry:
            if parents:
                node = self._ensure_dirs(t, split_path(path), mode, {})
            else:
                parent, name = self.ns.resolve_parent(t, path)
                node = self.ns.create(t, parent, name, Kind.DIR, _attrs(mode, time.time_ns()))
            return self._entry(t, node, _norm(path))
        return self.env.write(run)

    def remove(self, path: str, recursive: bool = False) -> int:
        """Remove a file, symlink or empty directory (any directory with recursive). Returns
        the number of nodes removed."""
        def run(t: LmdbTxn) -> int:
            node, version = self.ns.resolve_view(t, path)
            if version is not None:          # a conflict copy: retire that version everywhere
                self.ns.drop_version(t, node, version)
                return 1
            if recursive:
                return self._remove_tree(t, node)
            self.ns.remove(t, node)
            return 1
        return self.env.write(run)

    def _remove_tree(self, txn: LmdbTxn, node: Node) -> int:
        count = 0
        if node.kind == Kind.DIR:
            for _, nid, _ in list(self.ns.children(txn, node.id)):
                child = self.ns.get(txn, nid)
                if child is not None:
                    count += self._remove_tree(txn, child)
        self.ns.remove(txn, node)
        return count + 1

    def rename(self, src: str, dst: str) -> Entry:
        def run(t: LmdbTxn) -> Entry:
            node, version = self.ns.resolve_view(t, src)
            parent, name = self.ns.resolve_parent(t, dst)
            if version is not None:          # a conflict copy becomes a file of its own
                head = next(h for h in node.heads if h.key == version)
                if self.ns.lookup(t, parent.id, name) is not None:
                    raise ExistsError(f"{dst} exists")
                created = self.ns.create(t, parent, name, Kind.FILE,
                                         {k: v for k, (_, v) in node.attrs.items()},
                                         head.manifest, head.size)
                self.ns.drop_version(t, node, version)
                return self._entry(t, created, _norm(dst))
            self.ns.rename(t, node, parent, name)
            moved = self.ns.get(t, node.id)
            assert moved is not None
            return self._entry(t, moved, _norm(dst))
        return self.env.write(run)

    def _ensure_dirs(self, txn: LmdbTxn, parts: list[bytes], mode: int,
                     cache: dict[bytes, Node]) -> Node:
        node = self.ns.get(txn, ROOT)
        assert node is not None
        prefix = b""
        for part in parts:
            prefix += b"/" + part
            cached = cache.get(prefix)
            if cached is not None:
                node = cached
                continue
            nid = self.ns.lookup(txn, node.id, part)
            child = self.ns.get(txn, nid) if nid is not None else \
                self.ns.create(txn, node, part, Kind.DIR, _attrs(mode, time.time_ns()))
            assert child is not None
            if child.kind != Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(prefix)} is not a directory")
            cache[prefix] = node = child
        return node

    # -- adding ---------------------------------------------------------------------------
    def add_paths(self, paths: Iterable[str], dest: str = "/", recursive: bool = False,
                  on_progress: Callable[[int, int, int, int], None] | None = None
                  ) -> Iterator[AddResult]:
        """Add local files (and trees, with recursive) under dest. Yields one result per
        item, each after its commit is durable. on_progress(files, bytes, total_files,
        total_bytes) is called as work proceeds."""
        for group in self.add_paths_batches(paths, dest, recursive, on_progress):
            yield from group

    def add_paths_batches(self, paths: Iterable[str], dest: str = "/", recursive: bool = False,
                          on_progress: Callable[[int, int, int, int], None] | None = None
                          ) -> Iterator[list[AddResult]]:
        """add_paths, yielding the results of each commit together."""
        items, errors = plan_paths(paths, dest, recursive)
        if errors:
            yield errors
        yield from self.ingest_batches(items, on_progress)

    def ingest(self, items: Iterable[IngestItem],
               on_progress: Callable[[int, int, int, int], None] | None = None
               ) -> Iterator[AddResult]:
        """Commit items in batches; yields each result once its batch is durable."""
        for group in self.ingest_batches(items, on_progress):
            yield from group

    def ingest_batches(self, items: Iterable[IngestItem],
                       on_progress: Callable[[int, int, int, int], None] | None = None
                       ) -> Iterator[list[AddResult]]:
        """ingest, yielding the results of each commit (or each failed item) together."""
        items = list(items) if on_progress else items
        total_files = len(items) if isinstance(items, list) else 0
        total_bytes = sum(i.size for i in items) if isinstance(items, list) else 0
        done_files = done_bytes = 0
        batch: list[tuple[IngestItem, Manifest, list[Prepared], int]] = []
        batch_bytes = 0
        first = 0.0
        pipeline = ChunkPipeline(self.env, self.store, self.pool)
        progress_mutex = threading.Lock()

        def bytes_done(n: int) -> None:
            nonlocal done_bytes
            with progress_mutex:
                done_bytes += n
            if on_progress:
                on_progress(done_files, done_bytes, total_files, total_bytes)

        def flush() -> Iterator[list[AddResult]]:
            nonlocal batch, batch_bytes, done_files
            if not batch:
                return
            results = self.env.write(lambda t: self._commit(t, batch))
            done_files += len(batch)
            batch, batch_bytes = [], 0
            if on_progress:
                on_progress(done_files, done_bytes, total_files, total_bytes)
            yield results

        for item, outcome in self._prepared(items, pipeline, bytes_done):
            try:
                if isinstance(outcome, BaseException):
                    raise outcome
                manifest, prepared, new = outcome
            except StorageFullError:
                raise                 # not this item's fault: stop the add (exit 7, not 1)
            except (OSError, CastoreError) as exc:
                yield [AddResult(item.dest, kind=KIND_NAMES[item.kind], error=_describe(exc))]
                continue
            if not batch:
                first = time.monotonic()
            batch.append((item, manifest, prepared, new))
            batch_bytes += sum(p.raw_len for p in prepared)
            if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES or \
                    time.monotonic() - first >= BATCH_SECONDS:
                yield from flush()
        yield from flush()

    def _prepared(self, items: Iterable[IngestItem], pipeline: ChunkPipeline,
                  bytes_done: Callable[[int], None]
                  ) -> Iterator[tuple[IngestItem, tuple[Manifest, list[Prepared], int] |
                                      BaseException]]:
        """Each item with its prepared chunks, or the error that stopped it, in order. A
        streamed item is consumed before the next one is read."""
        for item in items:
            try:
                yield item, self._prepare(item, pipeline, bytes_done)
            except (OSError, CastoreError) as exc:
                yield item, exc

    def _prepare(self, item: IngestItem, pipeline: ChunkPipeline,
                 bytes_done: Callable[[int], None]) -> tuple[Manifest, list[Prepared], int]:
        """Hash and encode an item's chunks. Large files are stored here already, in their own
        batches; small ones come back as Prepared chunks for the batch commit."""
        if item.kind != Kind.FILE:
            return EMPTY, [], 0
        level = self.store.level
        if item.chunks is not None:
            manifest, new = pipeline.store_chunks(item.chunks, bytes_done)
            return manifest, [], new
        if item.data is not None:
            data = item.data
        else:
            assert item.source is not None
            fd = os.open(item.source, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                size = os.fstat(fd).st_size
                item.size = size
                if size > SMALL_FILE:
                    with chunking.FileChunks(fd, size) as chunks:
                        manifest, new = pipeline.store_chunks(chunks, bytes_done)
                    return manifest, [], new
                data = os.read(fd, size + 1) if size < (1 << 20) else _read_all(fd, size)
            finally:
                os.close(fd)
        if not data:
            prepared = []
        elif len(data) <= chunking.MIN_SIZE:
            prepared = [prepare(data, level)]
        else:
            prepared = [prepare(c, level) for c in chunking.split(data)]
        bytes_done(len(data))
        return Manifest(tuple(p.cid for p in prepared), tuple(p.raw_len for p in prepared)), \
            prepared, 0

    def _commit(self, txn: LmdbTxn, batch: list[tuple[IngestItem, Manifest, list[Prepared], int]]
                ) -> list[AddResult]:
        results = []
        dirs: dict[bytes, Node] = {}
        fresh: dict[NodeId, set[bytes]] = {}
        for item, manifest, prepared, new in batch:
            try:
                results.append(self._commit_one(txn, item, manifest, prepared, new, dirs,
                                                fresh))
            except CastoreError as exc:
                results.append(AddResult(item.dest, kind=KIND_NAMES[item.kind],
                                         error=_describe(exc)))
        return results

    def _commit_one(self, txn: LmdbTxn, item: IngestItem, manifest: Manifest,
                    prepared: list[Prepared], new: int, dirs: dict[bytes, Node],
                    fresh: dict[NodeId, set[bytes]]) -> AddResult:
        """Commit one item inside the batch's transaction. dirs caches directory nodes by
        path; fresh holds the directories this transaction created, with the names placed in
        them since, so a name in a new directory is known absent without a lookup."""
        dirname, _, base = item.dest.rstrip("/").rpartition("/")
        if not base:
            if item.kind == Kind.DIR:
                return AddResult("/", kind="dir")
            raise IsDirectoryError("/ is a directory")
        name = check_name(os.fsencode(base))
        attrs = _attrs(item.mode, item.mtime_ns or time.time_ns())
        parent = dirs.get(os.fsencode(dirname)) if dirname else None
        if parent is None:
            parent = self._ensure_dirs(txn, split_path(dirname), 0o755, dirs)
            dirs[os.fsencode(dirname)] = parent
        parts = [name]
        placed = fresh.get(parent.id)
        if placed is not None and name not in placed:
            existing_id = None                # a directory made in this transaction
        else:
            existing_id = self.ns.lookup(txn, parent.id, name)
            if existing_id is None and CONFLICT_TAG in name:   # writing a conflict copy
                view = self.ns.lookup_view(txn, parent.id, name)  # resolves the conflict
                existing_id = view.node if view is not None else None
        if placed is not None:
            placed.add(name)
        existing = self.ns.get(txn, existing_id) if existing_id else None
        path = _norm(item.dest)
        if item.kind == Kind.DIR:
            if existing is None:
                made = self.ns.create(txn, parent, name, Kind.DIR, attrs, known_absent=True)
                fresh[made.id] = set()
                dirs[os.fsencode(item.dest.rstrip("/"))] = made
            elif existing.kind != Kind.DIR:
                raise NotDirectoryError(f"{path} exists and is not a directory")
            else:
                self.ns.set_attrs(txn, existing, attrs)
            return AddResult(path, kind="dir")
        if item.kind == Kind.SYMLINK:
            if existing is not None:
                self.ns.remove(txn, existing)
            self.ns.create(txn, parent, parts[-1], Kind.SYMLINK,
                           {**attrs, b"target": item.target})
            return AddResult(path, kind="symlink", size=len(item.target))
        for p in prepared:
            new += self.store.put_encoded_in(txn, p.cid, p.raw_len, p.codec, p.stored)
        ref = self.files.put_content_in(txn, manifest)
        if existing is not None and existing.kind == Kind.DIR:
            raise IsDirectoryError(f"{path} is a directory")
        if existing is not None and existing.kind == Kind.SYMLINK:
            self.ns.remove(txn, existing)
            existing = None
        if existing is None:
            self.ns.create(txn, parent, parts[-1], Kind.FILE, attrs, ref, manifest.size,
                           known_absent=True)
        else:
            self.ns.set_content(txn, existing, ref, manifest.size, attrs)
        return AddResult(path, content=content_id(ref), size=manifest.size, new_chunks=new)

    # -- namespace sync -------------------------------------------------------------------
    def add_listener(self, fn: Callable[[list[Op], bool], None]) -> None:
        """fn(ops, local) runs after each commit that applied namespace ops (local=True for ops
        made here, False for ops received from peers). It must be quick and must not raise."""
        self.ns.listeners.append(fn)

    def version_vector(self) -> dict[bytes, int]:
        return self.env.read(self.ns.vv)

    def ops_since(self, vv: dict[bytes, int], limit: int = 10_000) -> list[Op]:
        """Ops this replica has that a replica with version vector vv lacks (up to limit)."""
        def run(t: LmdbTxn) -> list[Op]:
            out: list[Op] = []
            for origin, have in self.ns.vv(t).items():
                if have <= vv.get(origin, 0):
                    continue
                for op in self.ns.ops_after(t, origin, vv.get(origin, 0)):
                    out.append(op)
                    if len(out) >= limit:
                        return out
            return out
        return self.env.read(run)

    def apply_ops(self, ops: Iterable[Op]) -> int:
        """Apply ops received from a peer, in one transaction; returns how many were new."""
        batch = list(ops)
        return self.env.write(lambda t: sum(self.ns.apply(t, op) for op in batch)) \
            if batch else 0

    def release_held(self) -> int:
        return self.env.write(self.ns.release_held)

    def export_snapshot(self) -> Iterator[tuple[str, bytes, bytes]]:
        """The whole namespace as (table, key, value) rows from one consistent read: the op log
        and the tree materialized from it. A new peer loads it, then pulls the tail."""
        rows: list[tuple[str, bytes, bytes]] = []

        def run(t: LmdbTxn) -> None:
            for table in NAMESPACE_TABLES:
                for k, v in t.scan(table):
                    if table == "meta" and not bytes(k).startswith(b"vv:"):
                        continue
                    rows.append((table, bytes(k), bytes(v)))
        self.env.read(run)
        return iter(rows)

    def import_snapshot(self, rows: Iterable[tuple[str, bytes, bytes]]) -> int:
        """Load a snapshot into a repo whose namespace is still empty; returns rows loaded."""
        def run(t: LmdbTxn) -> int:
            if self.ns.last_key(t) is not None:
                raise RepoError("a snapshot can only be loaded into an empty namespace")
            n = 0
            for table, key, value in rows:
                if table not in NAMESPACE_TABLES:
                    raise RepoError(f"unexpected table {table!r} in a namespace snapshot")
                t.put(table, key, value)
                n += 1
            return n
        count = self.env.write(run)
        self.ns.clock.observe(self.env.read(self._last_ts))
        return count

    # -- checks and figures ---------------------------------------------------------------
    def stats(self) -> dict[str, int | float | str]:
        def run(t: LmdbTxn) -> dict[str, int | float | str]:
            counters = read_counters(t)
            files = dirs = symlinks = logical = 0
            for _, raw in t.scan("nodes"):
                node = Node.decode(NodeId(b"\x00" * 16), bytes(raw))
                if node.parent is None or node.parent == TRASH:
                    continue
                if node.kind == Kind.FILE:
                    files += 1
                    logical += node.head.size if node.head else 0
                elif node.kind == Kind.DIR:
                    dirs += 1
                elif node.kind == Kind.SYMLINK:
                    symlinks += 1
            ops = sum(self.ns.vv(t).values())
            return {"chunks": counters["chunks"], "raw_bytes": counters["raw_bytes"],
                    "stored_bytes": counters["stored_bytes"], "files": files, "dirs": dirs,
                    "symlinks": symlinks, "logical_bytes": logical, "ops": ops}
        out = self.env.read(run)
        raw, stored = int(out["raw_bytes"]), int(out["stored_bytes"])
        out["dedup_ratio"] = round(int(out["logical_bytes"]) / raw, 3) if raw else 1.0
        out["compression_ratio"] = round(raw / stored, 3) if stored else 1.0
        out["disk_bytes"] = self.env.disk_usage()
        out["map_size"] = self.env.map_size()
        out["replica"] = self.replica.hex()
        out["chunker"] = chunking.chunker_name()
        out["compression_level"] = self.store.level
        return out

    def verify(self, on_progress: Callable[[VerifyReport, int], None] | None = None
               ) -> VerifyReport:
        """Re-hash every local chunk and check every manifest. Never stops at the first
        problem; on_progress(report, total_chunks) is called every few chunks."""
        report = VerifyReport()
        total = int(self.env.read(lambda t: read_counters(t)["chunks"]))
        after: ChunkId | None = None
        while True:
            ids = self.env.read(lambda t: _chunk_page(t, after))
            if not ids:
                break
            for cid in ids:
                try:
                    report.bytes += len(self.store.get(cid))
                except IntegrityError:
                    report.corrupt.append(cid.hex)
                except ChunkNotFoundError:
                    report.missing.append(cid.hex)
                report.chunks += 1
                if on_progress and report.chunks % 16 == 0:
                    on_progress(report, total)
            after = ids[-1]
        self.env.read(lambda t: self._verify_manifests(t, report))
        if on_progress:
            on_progress(report, total)
        return report

    def _verify_manifests(self, txn: LmdbTxn, report: VerifyReport) -> None:
        for key, raw in txn.scan("manifests"):
            if len(raw) <= 4:
                continue
            report.manifests += 1
            mid = ChunkId(bytes(key))
            try:
                manifest = self.files.load_in(txn, mid)
            except IntegrityError:
                report.corrupt.append(mid.hex)
                continue
            if self.files.manifest_refs(txn, mid) == 0 or self.fetch is not None:
                continue      # in a cluster, chunks are placed on other peers: not missing
            for cid in manifest.chunks:
                if not self.store.has_in(txn, cid) and cid.hex not in report.missing:
                    report.missing.append(cid.hex)


def _chunk_page(txn: LmdbTxn, after: ChunkId | None) -> list[ChunkId]:
    out: list[ChunkId] = []
    for key, _ in txn.scan("chunkmeta", start=after.digest if after else None):
        cid = ChunkId(bytes(key))
        if after is not None and cid == after:
            continue
        out.append(cid)
        if len(out) >= 256:
            break
    return out


def plan_paths(paths: Iterable[str], dest: str, recursive: bool
               ) -> tuple[list[IngestItem], list[AddResult]]:
    """Walk local paths into ingest items (sorted, depth first) and per-path errors."""
    items: list[IngestItem] = []
    errors: list[AddResult] = []
    for raw in paths:
        src = os.path.abspath(raw)
        base = os.path.basename(src.rstrip("/")) or "root"
        target = _join(_norm(dest), base)
        try:
            info = os.lstat(src)
        except OSError as exc:
            errors.append(AddResult(raw, error=_describe(exc)))
            continue
        if st.S_ISDIR(info.st_mode) and not recursive:
            errors.append(AddResult(raw, kind="dir",
                                    error=f"{raw} is a directory (use -r to add it)"))
            continue
        _walk(src, target, info, items, errors)
    return items, errors


def _walk(src: str, target: str, info: os.stat_result, items: list[IngestItem],
          errors: list[AddResult]) -> None:
    mode, mtime = st.S_IMODE(info.st_mode), info.st_mtime_ns
    if st.S_ISREG(info.st_mode):
        items.append(IngestItem(target, Kind.FILE, mode, mtime, source=src, size=info.st_size))
    elif st.S_ISLNK(info.st_mode):
        items.append(IngestItem(target, Kind.SYMLINK, mode, mtime,
                                target=os.fsencode(os.readlink(src))))
    elif st.S_ISDIR(info.st_mode):
        items.append(IngestItem(target, Kind.DIR, mode, mtime))
        try:
            entries = sorted(os.scandir(src), key=lambda e: e.name)
        except OSError as exc:
            errors.append(AddResult(src, kind="dir", error=_describe(exc)))
            return
        for e in entries:
            try:
                _walk(e.path, _join(target, e.name), e.stat(follow_symlinks=False), items,
                      errors)
            except OSError as exc:
                errors.append(AddResult(e.path, error=_describe(exc)))
    else:
        errors.append(AddResult(src, error=f"{src}: not a regular file, directory or symlink"))


def _read_all(fd: int, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return bytes(view[:got])


def _attrs(mode: int, mtime_ns: int) -> dict[bytes, bytes | None]:
    return {b"mode": int_attr(mode & 0o7777), b"mtime": int_attr(mtime_ns)}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    return str(exc)


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    return "/" + "/".join(parts)


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _looks_like_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower())
