"""Namespace edits through the drive: mkdir, symlink, mknod, rmdir, unlink, rename, and the
hiding of files unlinked while open. Part of Vfs. Imports no FUSE code.
"""
from __future__ import annotations

import os
import time

from castore.errors import (ExistsError, InvalidNameError, IsDirectoryError, NotDirectoryError,
                            NotEmptyError, PathNotFoundError)
from castore.files import EMPTY_REF
from castore.ids import ROOT, NodeId
from castore.ops import Kind, file_attrs, split_path
from castore.store.lmdb import LmdbTxn
from castore.vfs.core import HIDDEN_GRACE
from castore.vfs.handles import FileHandleOps
from castore.vfs.openfile import OpenFile
from castore.vfs.types import HIDDEN, RENAME_NOREPLACE, NotPermittedError, Target


class NamespaceEdits(FileHandleOps):
    """Vfs's operations that change the tree."""

    def mkdir(self, path: str | bytes, mode: int = 0o755) -> None:
        def run(t: LmdbTxn) -> NodeId:
            parent, name = self._parent(t, path)
            self._ns.create(t, parent, name, Kind.DIR, file_attrs(mode, time.time_ns()),
                            known_absent=True)
            return parent.id
        self._subdirs_changed(self._write(run), +1)

    def symlink(self, path: str | bytes, target: str | bytes) -> None:
        raw = os.fsencode(target)
        if not raw or b"\x00" in raw or len(raw) > 4095:
            raise InvalidNameError("a symlink target is 1 to 4095 bytes without NUL")

        def run(t: LmdbTxn) -> None:
            parent, name = self._parent(t, path)
            self._ns.create(t, parent, name, Kind.SYMLINK,
                            {**file_attrs(0o777, time.time_ns()), b"target": raw},
                            known_absent=True)
        self._write(run)

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
            self._ns.create(t, parent, name, Kind.FILE, file_attrs(mode, time.time_ns()),
                            EMPTY_REF, 0, known_absent=True)
        self._write(run)

    def rmdir(self, path: str | bytes) -> None:
        self.settle()

        def run(t: LmdbTxn) -> NodeId | None:
            node = self._resolve(t, path).node
            if node is None or node.kind != Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(path)} is not a directory")
            if self._pending_children(node.id):
                raise NotEmptyError(f"{os.fsdecode(path)} is not empty")
            parent = node.parent
            self._ns.remove(t, node)
            return parent
        parent = self._write(run)
        if parent is not None:
            self._subdirs_changed(parent, -1)

    def unlink(self, path: str | bytes) -> None:
        parts = split_path(path)
        if parts and HIDDEN.match(parts[-1]):
            with self._registry():
                if parts[-1] in self._hidden:
                    # libfuse dropping a hidden name after the file's last close: an alias
                    # only. It still opens the file for a moment: a program that walked the
                    # path before the file was replaced (renamed over) opens it by that name.
                    self._hidden_gone[parts[-1]] = time.monotonic() + HIDDEN_GRACE
                    self._expire_hidden()
                    return
        self.settle()

        def run(t: LmdbTxn) -> Target:
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
        target = self._write(run)
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
        with self._renaming():
            self._rename(src, dst, flags)

    def _rename(self, src: str | bytes, dst: str | bytes, flags: int) -> None:
        dst_parts = split_path(dst)
        if not dst_parts:
            raise InvalidNameError("cannot rename over /")
        self.settle()
        if HIDDEN.match(dst_parts[-1]) and self._hide(src, dst_parts[-1]):
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
        self._write(run)
        for p in moved:
            self._subdirs.pop(p, None)

    def _hide(self, src: str | bytes, hidden: bytes) -> bool:
        """libfuse hiding a file unlinked (or renamed over) while open. False if src is not
        open here, so the rename is an ordinary one."""
        target = self._env.read(lambda t: self._resolve(t, src))
        of = target.of
        if of is None and target.node is not None and target.version is None:
            of = self._light_state(target.node.id)
        if of is None or of.handles == 0 or target.version is not None:
            return False
        node = target.node
        if node is not None:
            self._write(lambda t: self._ns.remove(t, self._ns.get(t, node.id) or node))
        self._forget(of)
        with self._registry():
            self._hidden[hidden] = of
            self._expire_hidden()
        return True

    def _expire_hidden(self) -> None:
        """Registry held: drop the aliases of hidden names libfuse dropped a while ago."""
        now = time.monotonic()
        for name, until in list(self._hidden_gone.items()):
            if until <= now:
                del self._hidden_gone[name]
                self._hidden.pop(name, None)
