"""castore.vfs: the store as a file system, behind the drive (DESIGN.md section 8).

Paths to nodes, open files shared by their descriptors, staging of writes, commits on close.
No FUSE import here: castore.fuse adapts this to mfusepy, and tests drive it directly.
"""
from __future__ import annotations

from castore.vfs.fs import (AccessDeniedError, Attr, AttributeTooLargeError, NoAttributeError,
                            NotPermittedError, Opened, UnsupportedError, Vfs)
from castore.vfs.committer import drive_commits
from castore.vfs.readcache import DeadlineError

__all__ = ["AccessDeniedError", "Attr", "AttributeTooLargeError", "DeadlineError",
           "NoAttributeError", "NotPermittedError", "Opened", "UnsupportedError", "Vfs",
           "drive_commits"]
