"""The drive's value types and errors: what stat reports, open handles, what a path resolves
to, the few errors beyond castore.errors, and small helpers on open files' attributes.
Imports no FUSE code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from castore.errors import CastoreError
from castore.ops import Attrs, Kind, Node, Version
from castore.vfs.openfile import OpenFile

RENAME_NOREPLACE = 1
XATTR_CREATE, XATTR_REPLACE = 1, 2
XATTR_MAX = 64 << 10
CASTORE_XATTRS = ("user.castore.id", "user.castore.chunks")
KERNEL_VERSIONS = 100_000       # files whose cached version is remembered (keep_cache)
HIDDEN = re.compile(rb"^\.fuse_hidden[0-9a-f]{16}$")    # libfuse's names for unlinked open files


class NoAttributeError(CastoreError):
    """No extended attribute of that name (ENODATA)."""


class NotPermittedError(CastoreError):
    """The operation is refused here: hard links, writing castore's own xattrs (EPERM)."""


class AccessDeniedError(CastoreError):
    """access(2) refused: running a file that has no x bit (EACCES)."""


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
    (the version is the one it cached them from). push: the kernel holds none of this
    version, and may be handed it whole now (Vfs.whole). direct:
    the kernel should pass this handle's writes straight through, caching none of them."""

    fh: int
    keep_cache: bool
    push: bool = False
    direct: bool = False


@dataclass(frozen=True, slots=True)
class Light:
    """The version a handle opened without open state of its own (Vfs.open: a reader of a
    file whose pages the kernel keeps usually reads nothing through the drive)."""

    node: Node
    key: bytes
    ref: bytes                   # the version's manifest reference
    size: int


@dataclass(slots=True)
class Handle:
    """An open file handle. of is None while the handle is light: its open state is made
    (VfsCore._handle) only when something needs it."""

    of: OpenFile | None
    writable: bool
    append: bool
    light: Light | None = None


@dataclass(slots=True)
class Target:
    node: Node | None            # committed node; None for a pending create or hidden name
    of: OpenFile | None          # the open state in use for it, if any
    version: bytes | None = None  # the head a conflict copy shows
    parent: Node | None = None
    name: bytes = b""


def head_of(node: Node | None, version: bytes | None) -> Version | None:
    """The version a path shows: the newest head, or a conflict copy's."""
    if node is None or not node.heads:
        return None
    if version is None:
        return node.heads[-1]
    return next((h for h in node.heads if h.key == version), None)


def overlaid(of: OpenFile) -> bool:
    """Attributes of this open file are kept with it, not committed on their own."""
    return of.node is None or of.unlinked or of.dirty


def apply_attrs(of: OpenFile, attrs: Attrs, keep: bool = True) -> None:
    """Reflect attributes in an open file's state (and keep them for its commit)."""
    mode, mtime = attrs.get(b"mode"), attrs.get(b"mtime")
    if mode is not None:
        of.mode = int.from_bytes(mode, "little", signed=True)
    if mtime is not None:
        of.mtime_ns = int.from_bytes(mtime, "little", signed=True)
    if keep:
        of.attrs.update(attrs)


