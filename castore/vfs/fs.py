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

from castore.vfs.edits import NamespaceEdits
from castore.vfs.types import (AccessDeniedError, Attr, AttributeTooLargeError, NoAttributeError,
                               NotPermittedError, Opened, UnsupportedError)
from castore.vfs.xattrs import XattrOps


class Vfs(NamespaceEdits, XattrOps):
    """The drive's file system over one Repo. Thread-safe: FUSE calls it from many threads.

    Paths are str (as mfusepy decodes them: UTF-8 with surrogateescape) or bytes. Errors are
    CastoreErrors (castore.errors plus the few in castore.vfs.types); anything else is a bug.
    """


__all__ = ["AccessDeniedError", "Attr", "AttributeTooLargeError", "NoAttributeError",
           "NotPermittedError", "Opened", "UnsupportedError", "Vfs"]
