"""The castore error tree. Translated to gRPC codes, errno and exit codes only at the edges
(rpc/errors.py, fuse.py, cli/__init__.py).

    CastoreError                                          gRPC               FUSE       exit
    ├── NotFoundError
    │   ├── ChunkNotFoundError   no such chunk/manifest → NOT_FOUND          EIO        3
    │   └── PathNotFoundError    no such path           → NOT_FOUND          ENOENT     3
    ├── IntegrityError           bytes don't hash to id → DATA_LOSS          EIO        4
    ├── PathError                bad or conflicting path → INVALID_ARGUMENT / FAILED_PRECONDITION
    │   ├── InvalidNameError     '/', NUL, '.', '..', >255 bytes             EINVAL/ENAMETOOLONG 2
    │   ├── NotDirectoryError  a path component is a file                  ENOTDIR    2
    │   ├── IsDirectoryError   file operation on a directory               EISDIR     2
    │   ├── ExistsError          target exists                               EEXIST     2
    │   └── NotEmptyError        directory not empty                         ENOTEMPTY  2
    ├── StorageFullError         disk or map full       → RESOURCE_EXHAUSTED ENOSPC     7
    ├── PeerUnavailableError     daemon/peer unreachable → UNAVAILABLE       EIO        5
    ├── RepoError                no repo / repo locked / bad repo           -           2
    ├── ConfigError              invalid config                             -           2
    └── UsageError               bad command-line input                     -           2
"""
from __future__ import annotations


class CastoreError(Exception):
    """Base of every error castore raises on purpose."""

    exit_code = 1


class NotFoundError(CastoreError):
    """Something named does not exist."""

    exit_code = 3


class ChunkNotFoundError(NotFoundError):
    """A chunk or manifest is not in the store."""


class PathNotFoundError(NotFoundError):
    """A path does not exist in the namespace."""


class IntegrityError(CastoreError):
    """Bytes do not hash to the id they are stored or sent under."""

    exit_code = 4


class PathError(CastoreError):
    """A path is malformed or conflicts with the tree."""

    exit_code = 2


class InvalidNameError(PathError):
    """A name contains '/' or NUL, is '.', '..', empty, or longer than 255 bytes."""


class NameTooLongError(InvalidNameError):
    """A name is longer than 255 bytes."""


class NotDirectoryError(PathError):
    """A component that must be a directory is not one."""


class IsDirectoryError(PathError):
    """A file operation was asked of a directory."""


class ExistsError(PathError):
    """The target name already exists."""


class NotEmptyError(PathError):
    """A directory to remove or replace is not empty."""


class StorageFullError(CastoreError):
    """The disk (or the LMDB map, past its limit) is full; nothing committed is lost."""

    exit_code = 7


class LimitError(CastoreError):
    """A request was refused for being over a cap: a message larger than the size limit, or
    more of something at once than the other side admits."""

    exit_code = 2


class DeadlineError(CastoreError):
    """An operation did not finish in time: a write waiting too long for the one before it, a
    file busy for too long, a chunk that did not arrive (slow disk, unreachable peer). On the
    drive the caller gets ETIMEDOUT."""

    exit_code = 5


class PeerUnavailableError(CastoreError):
    """The daemon or a peer could not be reached in time; the call may be retried."""

    exit_code = 5


class RepoError(CastoreError):
    """The repository is missing, unreadable or busy."""

    exit_code = 2


class ConfigError(CastoreError):
    """A configuration value is invalid."""

    exit_code = 2


class UsageError(CastoreError):
    """The command line asks for something impossible."""

    exit_code = 2
