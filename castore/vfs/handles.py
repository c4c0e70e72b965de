"""Open files through the drive: create and open (sharing one OpenFile per file on this
peer), read, write, truncate, and the commit of a new version at close. Part of Vfs. Imports no
FUSE code.
"""
from __future__ import annotations

import logging
import os
import time

from castore.errors import (CastoreError, ChunkNotFoundError, ExistsError, InvalidNameError,
                            IsDirectoryError, PathNotFoundError)
from castore.files import EMPTY, EMPTY_REF, Manifest, content_id
from castore.ids import ChunkId, NodeId
from castore import journal
from castore.journal import Intent
from castore.ops import Kind, Node, Version
from castore.store.lmdb import LmdbTxn
from castore.vfs.committer import AttrChange, Closing
from castore.vfs.core import VfsCore
from castore.vfs.openfile import OpenFile
from castore.vfs.readcache import DeadlineError, read_once
from castore.vfs.types import (KERNEL_VERSIONS, Handle, Light, NotPermittedError, Opened,
                               head_of)

log = logging.getLogger(__name__)
FSYNC_TIMEOUT = 60.0            # seconds fsync waits for W copies in a cluster


class _Landed(Exception):
    """A group of closes landed while an open looked: look again."""


class FileHandleOps(VfsCore):
    """Vfs's file-handle operations."""

    def close(self) -> None:
        """Commit what open files still hold, and stop the worker threads."""
        self._committer.close()
        for of in {id(h.of): h.of for h in list(self._handles.values())
                   if h.of is not None}.values():
            try:
                self._commit(of)
            except CastoreError as exc:
                log.error("could not commit an open file at shutdown: %s", exc)
            except Exception:  # never lose the rest because one failed
                log.exception("could not commit an open file at shutdown")
        self._handles.clear()
        self._read_pool.shutdown(wait=True, cancel_futures=True)
        self._write_pool.shutdown(wait=True, cancel_futures=True)

    def create(self, path: str | bytes, mode: int, flags: int = os.O_RDWR) -> Opened:
        """Create and open a file. It enters the namespace at its first commit. An existing
        file is opened instead, unless flags has O_EXCL (ExistsError)."""
        try:
            with self._registry():
                parent, name = self._env.read(lambda t: self._parent(t, path, True))
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
        """A handle on of. One opened for writing only writes around the kernel's page
        cache: copying every byte written into fresh cache pages cost the writer more than
        the whole write through the drive (a 1 GiB write: 250 MB/s through the cache, 500
        around it), and a small file's next reader is handed it at open anyway. The kernel
        then holds none of what it wrote: its next open hands a small file over whole
        (around, _unfilled)."""
        fh = next(self._fhs)
        acc = flags & os.O_ACCMODE
        self._handles[fh] = Handle(of, acc in (os.O_WRONLY, os.O_RDWR), bool(flags & os.O_APPEND))
        of.handles += 1
        direct = acc == os.O_WRONLY
        if direct:
            of.around = True
        return Opened(fh, True, direct=direct)

    def open(self, path: str | bytes, flags: int = os.O_RDONLY) -> Opened:
        """Open a file at the newest version known here (sharing the open state of a file
        already open here, unless that one is unchanged and older). Honours O_TRUNC and
        O_APPEND."""
        writable = (flags & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
        try:
            opened, of = self._open_stable(path, writable, flags)
        except ChunkNotFoundError:
            if self.repo.fetch is None:
                raise
            node = self._env.read(lambda t: self._resolve(t, path).node)
            head = node.heads[-1] if node is not None and node.heads else None
            if head is None:
                raise
            self.repo.fetch([ChunkId(bytes(head.manifest[-32:]))])
            opened, of = self._open_stable(path, writable, flags)
        if flags & os.O_TRUNC and writable:
            self._changed()
            try:
                of.truncate(0)
            except BaseException:
                self.release(opened.fh)
                raise
        return opened

    def _open_stable(self, path: str | bytes, writable: bool, flags: int
                     ) -> tuple[Opened, OpenFile | None]:
        """_open_in, again when a group of closes landed between its snapshot of the store
        and its look at the open files (see _stable)."""
        for _ in range(20):
            snap = 0

            def run(t: LmdbTxn) -> tuple[Opened, OpenFile | None]:
                nonlocal snap
                snap = t.txn_id()
                return self._open_in(t, path, writable, flags, snap)
            try:
                return self._env.read(run)
            except _Landed:
                continue
            except CastoreError:
                if self._committer.landing_txn <= snap:
                    raise
        self.settle()
        return self._env.read(lambda t: self._open_in(t, path, writable, flags))

    def _open_in(self, txn: LmdbTxn, path: str | bytes, writable: bool, flags: int,
                 txn_id: int = 0) -> tuple[Opened, OpenFile | None]:
        """txn_id: the snapshot's id, to check (once the open files can no longer change)
        that no commit it predates has started to change them. The open state is None for
        a light handle (_light_handle)."""
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
            if txn_id and self._committer.landing_txn > txn_id:
                raise _Landed
            of = target.of if target.version is None else None
            if node is not None and target.version is None:
                of = self._open.get(node.id)        # may have changed since the lookup
                if of is None and target.parent is not None:
                    # a file created here whose first commit is landing right now
                    of = self._pending.get((target.parent.id, target.name))
            head = head_of(node, target.version)
            head_key = head.key if head is not None else None
            if of is None and not writable and not flags & os.O_TRUNC and node is not None \
                    and head is not None and target.version is None:
                return self._light_handle(node, head), None
            # a hidden name, or a create not committed yet, has no node: its open state is
            # the file (libfuse opens a file unlinked or renamed over while open by its
            # hidden name)
            if of is None or (node is not None and not of.dirty and of.node is not None and
                              of.base_key != head_key):
                assert node is not None
                manifest = EMPTY if head is None else \
                    self._files.manifest_for(txn, head.manifest, head.size)
                of = OpenFile(self._svc, node.id, manifest, head_key,
                              bytes(head.manifest) if head is not None else EMPTY_REF,
                              *self._mode_mtime(node))
                if target.version is None:
                    self._open[node.id] = of
                    self._attach_light(of)
            opened = self._new_handle(of, flags)
            keep, push = True, False
            if of.node is not None and not of.dirty:
                keep = self._kernel.get(of.node) == of.base_key
                push = not keep or self._unfilled.pop(of.node, None) == of.base_key
                self._remember(of.node, of.base_key)
            return Opened(opened.fh, keep, push, opened.direct), of

    def _ahead_landed(self, of: OpenFile, nid: NodeId) -> None:
        """of's create landed as nid: the attribute changes journaled by its name meanwhile
        (VfsCore._attrs_ahead) belong to nid, and show through the overlay until they land
        (later in the same group, or in the next)."""
        ahead, of.attrs_ahead = of.attrs_ahead, []
        if not ahead:
            return
        with self._attrs_mutex:
            count, pending = self._attrs_pending.get(nid, (0, {}))
            for owner in ahead:
                owner.node = nid
                count += 1
                pending = {**pending, **owner.attrs}
            self._attrs_pending[nid] = (count, pending)

    def _light_handle(self, node: Node, head: Version) -> Opened:
        """Registry held. A handle for reading a committed version, with no open state yet:
        its reader usually finds every page in the kernel's cache (kept from an earlier
        open, or handed over whole at this one: whole()), and then no request but the
        RELEASE comes for it. The state is made when a READ, an fstat, or an unlink of the
        open file needs it (_materialize), or when the file is opened with state at this
        version (_attach_light), so that handles share it as they would have."""
        fh = next(self._fhs)
        h = Handle(None, False, False, Light(node, head.key, bytes(head.manifest), head.size))
        self._handles[fh] = h
        self._light.setdefault(node.id, {})[fh] = h
        keep = self._kernel.get(node.id) == head.key
        push = not keep or self._unfilled.pop(node.id, None) == head.key
        self._remember(node.id, head.key)
        return Opened(fh, keep, push)

    def _attach_light(self, of: OpenFile) -> None:
        """Registry held: the light handles of of's file and version share of from now on."""
        held = self._light.get(of.node) if of.node is not None else None
        if not held:
            return
        for fh, h in list(held.items()):
            if h.light is not None and h.light.key == of.base_key:
                del held[fh]
                h.of, h.light = of, None
                of.handles += 1
        if not held and of.node is not None:
            del self._light[of.node]

    def _materialize(self, h: Handle) -> None:
        """The open state of a light handle: the file's registered one at that version, or
        a new one (registered when the file has none), shared with the other light handles
        of that version. InvalidNameError if the handle was released meanwhile."""
        light = h.light
        if light is None:
            if h.of is None:
                raise InvalidNameError("the file handle was closed")
            return
        manifest = self._light_manifest(light)
        mode, mtime = self._mode_mtime(light.node)
        nid = light.node.id
        with self._registry():
            if h.of is not None:
                return
            if h.light is None:
                raise InvalidNameError("the file handle was closed")
            of = self._open.get(nid)
            if of is None or of.base_key != light.key:
                of = OpenFile(self._svc, nid, manifest, light.key, light.ref, mode, mtime)
                self._open.setdefault(nid, of)
            self._attach_light(of)

    def _light_state(self, nid: NodeId) -> OpenFile | None:
        """The open state of a light handle of the file nid (made now), or None if it has
        none: libfuse hides a file unlinked while open, and the name it hides it under
        stands for that state (NamespaceEdits._hide)."""
        with self._registry():
            held = next(iter(self._light.get(nid, {}).values()), None)
        if held is None:
            return None
        try:
            self._materialize(held)
        except InvalidNameError:            # released meanwhile
            return None
        return held.of

    def _light_manifest(self, light: Light) -> Manifest:
        """The manifest of a light handle's version; in cluster mode fetched first when this
        peer does not hold it (as open does for a handle with state)."""
        try:
            return self._env.read(lambda t: self._files.manifest_for(t, light.ref, light.size))
        except ChunkNotFoundError:
            if self.repo.fetch is None:
                raise
        self.repo.fetch([ChunkId(light.ref[-32:])])
        return self._env.read(lambda t: self._files.manifest_for(t, light.ref, light.size))

    def _drop_light(self, fh: int, h: Handle) -> None:
        """Registry held: release a light handle."""
        light, h.light = h.light, None
        if light is None:
            return
        held = self._light.get(light.node.id)
        if held is not None:
            held.pop(fh, None)
            if not held:
                del self._light[light.node.id]

    def _mode_mtime(self, node: Node) -> tuple[int, int]:
        shown = self._overlay(node)
        assert shown is not None
        return shown.attr_int(b"mode", 0o644), shown.attr_int(b"mtime")

    def _remember(self, nid: NodeId, key: bytes | None) -> None:
        self._kernel[nid] = key
        self._kernel.move_to_end(nid)
        while len(self._kernel) > KERNEL_VERSIONS:
            self._kernel.popitem(last=False)

    def whole(self, fh: int, limit: int) -> bytes | bytearray | None:
        """The content of a file just opened, for the kernel's page cache (castore.fuse: a
        small file handed over at open spares its reader the READ, and the GETATTR that
        follows every READ). None when that would not be safe or cheap: the file has
        unsaved writes, other handles sharing this one's open state, more than limit bytes
        or none, a rename through the drive is under way or just ended (_renaming), or a
        chunk cannot be read here now (the READ then says why). A handle without open
        state (_light_handle) is read from its version's manifest, in one transaction."""
        h = self._handles.get(fh)
        light = h.light if h is not None and h.of is None else None
        if light is not None:
            if not 0 < light.size <= limit or not self._names_settled():
                return None
            self._first_read()
            try:
                return self._env.read(lambda t: self._source.whole_in(
                    t, self._files.manifest_for(t, light.ref, light.size)))
            except ChunkNotFoundError:
                pass                        # read_once fetches what is not held here
            except CastoreError:
                return None
            buf = bytearray(light.size)
            try:
                manifest = self._light_manifest(light)
                n = read_once(manifest, self._svc.source, 0, memoryview(buf))
            except CastoreError:
                return None
            return buf if n == len(buf) else None
        of = self._state(fh)
        if of.dirty or of.node is None or of.handles != 1 or not 0 < of.size <= limit or \
                not self._names_settled():
            return None
        if not of.read_started:
            of.read_started = True
            self._first_read()
        buf = bytearray(of.size)
        try:
            n = of.read_once(0, memoryview(buf))
        except CastoreError:
            return None
        return buf if n == len(buf) else None

    def alone(self, fh: int) -> bool:
        """Nothing else opened this handle's file, and it has no unsaved writes (the pages
        pushed for it are still its content)."""
        with self._registry():
            h = self._handles.get(fh)
            if h is None:
                raise InvalidNameError(f"no open file with handle {fh}")
            if h.of is None:                # a writer of this version would have shared it
                return True
            return h.of.handles == 1 and not h.of.dirty

    def read(self, fh: int, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        n = self.read_into(fh, offset, memoryview(buf))
        return bytes(buf[:n])

    def read_into(self, fh: int, offset: int, dest: memoryview) -> int:
        """Fill dest from offset; returns the byte count (less only at the end of file)."""
        of = self._state(fh)
        if not of.read_started:
            of.read_started = True
            self._first_read()
        return of.read_into(offset, dest)

    def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        """Write through an open handle; data is only read during the call."""
        h = self._handle(fh)
        self._changed()
        assert h.of is not None
        return h.of.write(None if h.append else offset, data)

    def truncate(self, path: str | bytes | None, length: int, fh: int | None = None) -> None:
        if length < 0:
            raise InvalidNameError("a negative length")
        self._changed()
        if fh is not None and fh in self._handles:
            self._state(fh).truncate(length)
            return
        if path is None:
            raise PathNotFoundError("no path and no open file")
        opened = self.open(path, os.O_WRONLY)
        try:
            self._state(opened.fh).truncate(length)
            self.flush(opened.fh)
        finally:
            self.release(opened.fh)

    def flush(self, fh: int) -> None:
        """close() of a descriptor: what was written is in the close journal on return (it
        survives the daemon being killed) and committed with the next group."""
        self._commit(self._state(fh), wait=False)

    def fsync(self, fh: int) -> None:
        """Commit durably, and in a cluster also wait until the content is on W peers
        (DESIGN.md section 5); DeadlineError if that is not confirmed within FSYNC_TIMEOUT."""
        of = self._state(fh)
        self._commit(of)
        if of.node is not None and of.node in self._attrs_pending:
            self.settle()                   # its attribute changes too
        if self.repo.durability is not None and of.size and not of.unlinked:
            ok, w, copies = self.repo.wait_durable([content_id(of.base_ref)], FSYNC_TIMEOUT)
            if not ok:
                raise DeadlineError(f"fsync: the content is on {copies} of the {w} peers it "
                                    f"needs after {FSYNC_TIMEOUT:.0f} s")

    def release(self, fh: int) -> None:
        """The last close of a descriptor: commit anything left, drop the state when no
        descriptor uses it any more (or, for a close still on its way to the store, when
        its commit lands)."""
        h = self._handles.pop(fh, None)
        if h is None:
            return
        if h.of is None:
            with self._registry():
                if h.of is None:
                    self._drop_light(fh, h)
                    return
        of = h.of
        try:
            # a clean file has nothing to commit, and with no other handle nothing can
            # change that meanwhile: no lock to take
            if of.handles <= 1 and of.dirty:
                self._commit(of, wait=False)
        finally:
            with self._registry():
                of.handles -= 1
                last = of.handles <= 0 and of.inflight is None
                if last:
                    self._unregister(of)
            if last:
                of.close()

    def _unregister(self, of: OpenFile) -> None:
        """Registry held."""
        if of.node is not None and self._open.get(of.node) is of:
            del self._open[of.node]
        if of.parent is not None and self._pending.get((of.parent, of.name)) is of:
            del self._pending[(of.parent, of.name)]

    def _commit(self, of: OpenFile, force: bool = False, wait: bool = True) -> None:
        """Commit what of holds. wait=False: journal it and commit it with the next group
        (of stays registered and serves its content until then); wait=True: durable on
        return."""
        pending = of.inflight
        if pending is not None:
            if not wait:
                return                      # unchanged since that close (writes wait for it)
            if not pending.wait(FSYNC_TIMEOUT):
                raise DeadlineError("a closed file was not committed in time")
        with of.settled():
            if of.unlinked:         # nothing to commit; its last release drops the writes
                return
            if not of.dirty and not force:
                return
            built = of.build()
            intent = Intent(built.manifest, built.prepared, of.node, of.parent, of.name,
                            of.base_key, of.mode, of.mtime_ns, dict(of.attrs))
            if not wait:
                try:
                    closing = self._committer.submit(intent, of)
                except CastoreError as exc:     # e.g. disk full: commit now, and say so
                    log.info("committing a closed file directly: %s", exc)
                else:
                    of.inflight = closing.done
                    self._changed()
                    return
            txn_id = 0

            def run(t: LmdbTxn) -> tuple[NodeId, bytes, bytes]:
                nonlocal txn_id
                txn_id = t.txn_id()
                return journal.apply(t, self._ns, self._files, self._store, intent)
            nid, key, ref = self._write(run)
            self._committer.landing(txn_id)
            was_pending = of.node is None
            of.committed(built.manifest, key, ref, nid)
        self._registered(of, was_pending, nid, key)

    def _registered(self, of: OpenFile, was_pending: bool, nid: NodeId, key: bytes) -> None:
        with self._registry():
            self._registered_locked(of, was_pending, nid, key)

    def _registered_locked(self, of: OpenFile, was_pending: bool, nid: NodeId, key: bytes
                           ) -> None:
        if was_pending:
            if self._pending.get((of.parent, of.name)) is of:  # type: ignore[arg-type]
                del self._pending[(of.parent, of.name)]  # type: ignore[arg-type]
            self._open.setdefault(nid, of)
        # The kernel keeps the pages that single writes filled whole: a file written in
        # pieces that split pages would read back through one request per gap, so it is read
        # anew, in large requests, at its next open.
        if of.around:
            # the kernel holds only what a reader read of this version, in whole readahead
            # windows: it may keep that, and is handed a small file whole at the next open
            of.around = False
            self._remember(nid, key)
            self._unfilled[nid] = key
            while len(self._unfilled) > KERNEL_VERSIONS:
                self._unfilled.popitem(last=False)
        else:
            self._remember(nid, None if of.ragged else key)

    def _landed(self, closing: Closing) -> None:
        """The committer's callback: a close reached the store (or could not). The open
        file changes under the registry, so an open deciding whether to share it never sees
        it change halfway."""
        of = closing.owner
        if isinstance(of, AttrChange):
            if closing.error is not None:
                log.warning("an attribute change could not be committed: %s", closing.error)
            self._attrs_landed(of.node)
            return
        assert isinstance(of, OpenFile)
        with self._registry():
            with of.locked():
                was_pending = of.node is None
                if closing.result is not None:
                    nid, key, ref = closing.result
                    of.committed(closing.intent.manifest, key, ref, nid)
                    self._ahead_landed(of, nid)
                of.inflight = None
            if closing.result is not None:
                self._registered_locked(of, was_pending, closing.result[0],
                                        closing.result[1])
            self._changed()
            last = of.handles <= 0
            if last:
                self._unregister(of)
        if last:
            of.close()
