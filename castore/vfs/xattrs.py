"""Extended attributes of the drive: read-only user.castore.id (the content id of the version
shown) and user.castore.chunks (its chunk count), and user.* attributes kept in the namespace
as node attributes named b"x:" + name. Part of Vfs. Imports no FUSE code.
"""
from __future__ import annotations

from castore.errors import ExistsError
from castore.files import content_id
from castore.ops import Kind
from castore.store.lmdb import LmdbTxn
from castore.vfs.core import VfsCore
from castore.vfs.types import (CASTORE_XATTRS, XATTR_CREATE, XATTR_MAX, XATTR_REPLACE,
                               AttributeTooLargeError, NoAttributeError, NotPermittedError,
                               Target, UnsupportedError, head_of, overlaid)


class XattrOps(VfsCore):
    """Vfs's extended-attribute operations."""

    def getxattr(self, path: str | bytes, name: str) -> bytes:
        if not name.startswith("user."):
            raise NoAttributeError(name)
        if name in CASTORE_XATTRS:
            self.settle()               # the id of a file just closed is known at its commit

        def run(t: LmdbTxn) -> bytes:
            target = self._resolve(t, path)
            node, of = self._overlay(target.node), target.of
            if name in CASTORE_XATTRS:
                head = head_of(node, target.version)
                if head is None or (node is not None and node.kind != Kind.FILE):
                    raise NoAttributeError(name)
                if name == "user.castore.id":
                    return content_id(head.manifest).encode()
                return str(self._files.chunk_count(t, head.manifest)).encode()
            key = b"x:" + name.encode("utf-8", "surrogateescape")
            if of is not None and overlaid(of) and key in of.attrs:
                value = of.attrs[key]
            else:
                value = node.attr(key) if node is not None else None
            if value is None:
                raise NoAttributeError(name)
            return bytes(value)
        return self._stable(run)

    def listxattr(self, path: str | bytes) -> list[str]:
        self.settle()

        def run(t: LmdbTxn) -> list[str]:
            target = self._resolve(t, path)
            node, of = self._overlay(target.node), target.of
            names: dict[str, None] = {}
            if node is not None and node.kind == Kind.FILE and node.heads:
                names.update(dict.fromkeys(CASTORE_XATTRS))
            if node is not None:
                for k, (_, v) in node.attrs.items():
                    if k.startswith(b"x:") and v is not None:
                        names[k[2:].decode("utf-8", "surrogateescape")] = None
            if of is not None and overlaid(of):
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

        def check(target: Target) -> None:
            exists = self._has_xattr(target, key)
            if flags & XATTR_CREATE and exists:
                raise ExistsError(f"{name} exists")
            if flags & XATTR_REPLACE and not exists:
                raise NoAttributeError(name)
        self._set_attrs(path, {key: bytes(value)}, check)

    def removexattr(self, path: str | bytes, name: str) -> None:
        self._check_xattr_name(name)
        key = b"x:" + name.encode("utf-8", "surrogateescape")

        def check(target: Target) -> None:
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
    def _has_xattr(target: Target, key: bytes) -> bool:
        of, node = target.of, target.node
        if of is not None and overlaid(of) and key in of.attrs:
            return of.attrs[key] is not None
        return node is not None and node.attr(key) is not None
