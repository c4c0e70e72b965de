"""The drive's FUSE adapter: mfusepy on libfuse3 over castore.vfs. It only translates calls,
buffers and errors (errno is chosen here and nowhere else), and runs the mount's lifecycle.
Imported lazily (castore.node, on --mount): importing it loads libfuse3.

Facts this relies on (DESIGN.md section 8, research/probes.md section 1): mfusepy binds libfuse2
unless FUSE_LIBRARY_NAME=fuse3 is set before it is imported; mfusepy 3.1.1 drops renameat2
flags and truncate's file handle, so both are passed through here; attribute names of the
Operations object that match FUSE operations become callbacks, so state lives under _names;
per-open keep_cache (never the global kernel_cache) keeps the page cache of unchanged files,
and with explicit invalidation a new mtime alone drops no pages; fuse_lowlevel_notify_store
fills the page cache of a file the kernel holds (its node id comes from name_to_handle_at,
which FUSE builds from it) and is safe inside OPEN; a write-only handle opened with direct_io
writes around the page cache;
fuse_invalidate_path and the entry notifications, called from a thread of our own and never
from inside an operation, drop what the kernel caches of paths changed on other peers.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

if "FUSE_LIBRARY_PATH" not in os.environ:
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"    # mfusepy would pick libfuse2 first otherwise

import mfusepy  # noqa: E402

from castore import mounts  # noqa: E402
from castore.errors import (CastoreError, ChunkNotFoundError, ExistsError,  # noqa: E402
                            IntegrityError, InvalidNameError, IsDirectoryError,
                            NameTooLongError, NotDirectoryError, NotEmptyError,
                            PathNotFoundError, PeerUnavailableError, StorageFullError)
from castore.mounts import MountError  # noqa: E402
from castore.nssync import Changed, changed_paths, top_level_paths  # noqa: E402
from castore.ops import Kind, Op  # noqa: E402
from castore.repo import Repo  # noqa: E402
from castore.vfs import (AccessDeniedError, Attr, AttributeTooLargeError,  # noqa: E402
                         DeadlineError, NoAttributeError, NotPermittedError, UnsupportedError,
                         Vfs, drive_commits)

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

if mfusepy.fuse_version_major != 3:              # pragma: no cover - depends on the machine
    raise ImportError(f"castore needs libfuse3, but mfusepy loaded {mfusepy._libfuse_path}")

ATTR_TIMEOUT = 10.0              # seconds the kernel caches attributes and names (changes not
                                 # made through the mount are invalidated at once: Invalidator)
MOUNT_TIMEOUT = 15.0             # seconds to wait for a mount to come up
UNMOUNT_JOIN = 5.0               # seconds to wait for the FUSE loop to end after unmounting
INVALIDATE_BATCH = 20_000        # ops turned into paths at a time
BLKSIZE = 128 << 10              # st_blksize: programs size their I/O buffers from it
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_READDIR_PLUS, _FILL_DIR_PLUS = 1, 2     # libfuse3 fuse_readdir_flags, fuse_fill_dir_flags
_CAP_AUTO_INVAL_DATA, _CAP_EXPLICIT_INVAL_DATA = 1 << 12, 1 << 25     # fuse_conn_info.want
DIR_LISTINGS = 256              # directory listings being read, kept for their next READDIR
DIR_ENTRIES = 200_000           # entries those hold together at most
PUSH_LIMIT = 256 << 10           # files opened for reading up to this size are pushed whole

# Most specific first: NameTooLongError is an InvalidNameError.
ERRNO: list[tuple[type[BaseException], int]] = [
    (PathNotFoundError, errno.ENOENT), (NotDirectoryError, errno.ENOTDIR),
    (IsDirectoryError, errno.EISDIR), (NameTooLongError, errno.ENAMETOOLONG),
    (InvalidNameError, errno.EINVAL), (ExistsError, errno.EEXIST),
    (NotEmptyError, errno.ENOTEMPTY), (IntegrityError, errno.EIO),
    (ChunkNotFoundError, errno.EIO), (StorageFullError, errno.ENOSPC),
    (NoAttributeError, errno.ENODATA), (AccessDeniedError, errno.EACCES),
    (NotPermittedError, errno.EPERM),
    (UnsupportedError, errno.ENOTSUP), (AttributeTooLargeError, errno.E2BIG),
    (DeadlineError, errno.ETIMEDOUT), (PeerUnavailableError, errno.EIO)]
_LOUD = (errno.EIO, errno.ENOSPC, errno.ETIMEDOUT)
_TYPE = {Kind.FILE: 0o100000, Kind.DIR: 0o040000, Kind.SYMLINK: 0o120000}


def errno_of(exc: BaseException) -> int:
    """The errno a caller of the drive sees for an exception (EIO for anything unexpected)."""
    for kind, code in ERRNO:
        if isinstance(exc, kind):
            return code
    if isinstance(exc, OSError) and isinstance(exc.errno, int) and exc.errno > 0:
        return exc.errno
    return errno.EIO


def _translated(fn: F) -> F:
    """Run a FUSE operation, turning every error into a FuseOSError with the right errno."""
    @wraps(fn)
    def run(*args: Any) -> Any:
        try:
            return fn(*args)
        except mfusepy.FuseOSError:
            raise
        except CastoreError as exc:
            code = errno_of(exc)
            if code in _LOUD:
                log.error("%s: %s (%s)", fn.__name__, exc, errno.errorcode.get(code, code))
            raise mfusepy.FuseOSError(code) from None
        except OSError as exc:
            code = errno_of(exc)
            if code in _LOUD:
                log.error("%s: %s", fn.__name__, exc)
            raise mfusepy.FuseOSError(code) from None
        except Exception:
            log.exception("castore drive: unexpected error in %s", fn.__name__)
            raise mfusepy.FuseOSError(errno.EIO) from None
    return run  # type: ignore[return-value]


def _fh(fi: Any) -> int | None:
    if fi is None:
        return None
    return int(fi) if isinstance(fi, int) else int(fi.fh)


def _stat(a: Attr) -> dict[str, int]:
    return {"st_mode": _TYPE[a.kind] | a.mode, "st_nlink": a.nlink, "st_size": a.size,
            "st_uid": a.uid, "st_gid": a.gid, "st_mtime": a.mtime_ns, "st_ctime": a.mtime_ns,
            "st_atime": a.mtime_ns, "st_blocks": (a.size + 511) // 512,
            "st_blksize": BLKSIZE}


class CastoreOps(mfusepy.Operations):  # type: ignore[misc]
    """FUSE operations over a Vfs. With raw_fi, file operations get the fuse_file_info."""

    use_ns = True                       # times are int nanoseconds

    def __init__(self, vfs: Vfs, mountpoint: str = "") -> None:
        self._vfs = vfs
        self._mountpoint = os.fsencode(mountpoint)
        self._fuse_ptr: int | None = None
        self.notify: _Notify | None = None
        self.pushed = 0                  # files handed to the kernel at open (for debuggers)
        self._ready = threading.Event()
        # listings being read, by libfuse's directory handle (its address): the READDIRs
        # that continue one are served from it. No OPENDIR or RELEASEDIR reaches Python
        # (libfuse answers them), so the oldest are dropped beyond DIR_LISTINGS handles or
        # DIR_ENTRIES entries; a continuation that finds none lists the directory again.
        self._dirs: OrderedDict[int, tuple[str, list[tuple[bytes, Attr | None]]]] = \
            OrderedDict()
        self._dirs_held = 0
        self._dirs_mutex = threading.Lock()

    def init_with_config(self, conn: Any, config: Any) -> None:
        self._fuse_ptr = mfusepy._libfuse.fuse_get_context().contents.fuse
        if conn is not None and conn.capable & _CAP_EXPLICIT_INVAL_DATA:
            # Pages go when castore says the content changed (keep_cache per version at
            # open, the Invalidator for changes not made through this mount), not whenever
            # the kernel sees a new mtime: writes move the mtime, which made it drop every
            # page just written.
            conn.want = (conn.want & ~_CAP_AUTO_INVAL_DATA) | _CAP_EXPLICIT_INVAL_DATA
        if config is not None:
            config.attr_timeout = ATTR_TIMEOUT
            config.entry_timeout = ATTR_TIMEOUT
            config.negative_timeout = ATTR_TIMEOUT
            config.kernel_cache = 0      # it would override the per-open keep_cache choice
            config.hard_remove = 0       # unlinked open files: hidden names (see castore.vfs)
        self._ready.set()

    # -- attributes -----------------------------------------------------------------------
    @_translated
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        """Defined so that mfusepy registers the getattr callback; the mount serves it
        through _Fuse.getattr_fuse_3 and attr() below, without the dict."""
        return _stat(self._vfs.getattr(path, _fh(fh)))

    @_translated
    def attr(self, path: str | None, fh: int | None) -> Attr | None:
        """getattr as an Attr (_Fuse fills libfuse's struct stat from it); None for a path
        whose last component does not exist (ENOENT without an exception)."""
        if fh is None and path is not None:
            return self._vfs.lookup(path)
        return self._vfs.getattr(path, fh)

    @_translated
    def readdir(self, path: str, fh: Any) -> list[Any]:
        out: list[Any] = [".", ".."]
        for name, kind in self._vfs.readdir(path):
            out.append((name.decode("utf-8", "surrogateescape"), {"st_mode": _TYPE[kind]}, 0))
        return out

    @_translated
    def listing(self, path: str, handle: int, fresh: bool) -> list[tuple[bytes, Attr | None]]:
        """The entries of an open directory with their attributes (None for . and ..), read
        once per pass (offset 0) and served from there to the calls that continue it.
        handle: libfuse's handle of the open directory (unique while it is open)."""
        if not fresh:
            with self._dirs_mutex:
                held = self._dirs.get(handle)
            if held is not None and held[0] == path:
                return held[1]
        entries: list[tuple[bytes, Attr | None]] = [(b".", None), (b"..", None)]
        entries.extend(self._vfs.readdir_attrs(path))
        with self._dirs_mutex:
            old = self._dirs.pop(handle, None)
            self._dirs_held += len(entries) - (len(old[1]) if old is not None else 0)
            self._dirs[handle] = (path, entries)
            while self._dirs and (len(self._dirs) > DIR_LISTINGS or
                                  self._dirs_held > DIR_ENTRIES) and \
                    next(iter(self._dirs)) != handle:
                _, (_, dropped) = self._dirs.popitem(last=False)
                self._dirs_held -= len(dropped)
        return entries

    @_translated
    def chmod(self, path: str | None, mode: int) -> int:
        if path is None:
            raise PathNotFoundError("chmod of an unlinked file")
        self._vfs.chmod(path, mode)
        return 0

    @_translated
    def chown(self, path: str | None, uid: int, gid: int) -> int:
        if path is None:
            raise PathNotFoundError("chown of an unlinked file")
        self._vfs.chown(path, uid, gid)
        return 0

    @_translated
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path is None:
            raise PathNotFoundError("utimens of an unlinked file")
        if times is None:
            mtime: int | None = time.time_ns()
        else:
            mtime = int(times[1])
            if mtime == UTIME_NOW:
                mtime = time.time_ns()
            elif mtime == UTIME_OMIT:
                mtime = None
        self._vfs.utimens(path, mtime)
        return 0

    @_translated
    def access(self, path: str, amode: int) -> int:
        self._vfs.access(path, bool(amode & os.X_OK))
        return 0

    @_translated
    def statfs(self, path: str) -> dict[str, int]:
        return self._vfs.statfs()

    # -- extended attributes --------------------------------------------------------------
    @_translated
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        return self._vfs.getxattr(path, name)

    @_translated
    def setxattr(self, path: str, name: str, value: bytes, options: int,
                 position: int = 0) -> int:
        self._vfs.setxattr(path, name, value, options)
        return 0

    @_translated
    def listxattr(self, path: str) -> list[str]:
        return self._vfs.listxattr(path)

    @_translated
    def removexattr(self, path: str, name: str) -> int:
        self._vfs.removexattr(path, name)
        return 0

    # -- namespace ------------------------------------------------------------------------
    @_translated
    def mkdir(self, path: str, mode: int) -> int:
        self._vfs.mkdir(path, mode)
        return 0

    @_translated
    def rmdir(self, path: str) -> int:
        self._vfs.rmdir(path)
        return 0

    @_translated
    def unlink(self, path: str) -> int:
        self._vfs.unlink(path)
        return 0

    @_translated
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        self._vfs.rename(old, new, flags)
        return 0

    @_translated
    def symlink(self, path: str, target: str) -> int:
        # mfusepy's order: the new link's path, then what it points to
        self._vfs.symlink(path, target)
        return 0

    @_translated
    def readlink(self, path: str) -> str:
        return self._vfs.readlink(path).decode("utf-8", "surrogateescape")

    @_translated
    def link(self, target: str, source: str) -> int:
        self._vfs.link(source, target)
        return 0

    @_translated
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._vfs.mknod(path, mode)
        return 0

    # -- files ----------------------------------------------------------------------------
    @_translated
    def create(self, path: str, mode: int, fi: Any = None) -> int:
        opened = self._vfs.create(path, mode, fi.flags | os.O_CREAT)
        fi.direct_io = 1 if opened.direct else 0
        fi.fh = opened.fh
        return 0

    @_translated
    def open(self, path: str, fi: Any) -> int:
        opened = self._vfs.open(path, fi.flags)
        keep = opened.keep_cache
        if (fi.flags & os.O_ACCMODE) == os.O_RDONLY:
            fi.noflush = 1               # nothing to commit: the kernel can skip FLUSH
            if opened.push:
                pushed = self._push(path, opened.fh)
                if pushed is not None:
                    keep = pushed
        fi.keep_cache = 1 if keep else 0
        fi.direct_io = 1 if opened.direct else 0
        fi.fh = opened.fh
        return 0

    def _push(self, path: str, fh: int) -> bool | None:
        """Hand a small file just opened for reading, of which the kernel holds nothing, to
        the kernel's page cache before the open returns. Its reader then finds every page
        there: it sends no READ, and so no GETATTR either (the kernel forgets the atime
        after each READ, and tar, cp and rsync stat the file after reading it), two round
        trips of the four a walk pays per file. None when nothing was pushed; else whether
        the kernel may keep the pages (they are still the file's content)."""
        notify = self.notify
        if notify is None or not self._mountpoint:
            return None
        # Only a shortcut: it never fails the open (the handle exists already, and a failed
        # OPEN gets no RELEASE). Whatever goes wrong is left to the READs that follow.
        try:
            data = self._vfs.whole(fh, PUSH_LIMIT)
        except Exception as exc:
            log.debug("not handing %s to the kernel at open: %r", path, exc)
            return None
        if data is None or not notify.store(self._mountpoint + os.fsencode(path), 0, data):
            return None
        self.pushed += 1
        # a writer that opened the file meanwhile may have put its own pages there: the
        # kernel drops them all at this open then (keep_cache 0), and reads them back
        try:
            return self._vfs.alone(fh)
        except Exception as exc:
            log.debug("dropping the pages handed over for %s: %r", path, exc)
            return False

    @_translated
    def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
        return self._vfs.read(_fh(fh) or 0, offset, size)

    @_translated
    def read_into(self, dest: memoryview, offset: int, fh: int) -> int:
        return self._vfs.read_into(fh, offset, dest)

    @_translated
    def write(self, path: str | None, data: bytes | memoryview, offset: int, fh: Any) -> int:
        return self._vfs.write(_fh(fh) or 0, offset, data)

    @_translated
    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        self._vfs.truncate(path, length, _fh(fh))
        return 0

    @_translated
    def flush(self, path: str | None, fh: Any) -> int:
        self._vfs.flush(_fh(fh) or 0)
        return 0

    @_translated
    def fsync(self, path: str | None, datasync: int, fh: Any) -> int:
        self._vfs.fsync(_fh(fh) or 0)
        return 0

    @_translated
    def release(self, path: str | None, fh: Any) -> int:
        self._vfs.release(_fh(fh) or 0)
        return 0


# libfuse worker threads (by threading.get_ident) that keep their Python thread state; a
# worker that ends leaves its state behind (libfuse 3 keeps its workers while mounted)
_PINNED: set[int] = set()
_gil_ensure = ctypes.pythonapi.PyGILState_Ensure
_gil_ensure.restype = ctypes.c_int


# ctypes makes a new type for each array length it is asked for (about 9 us each): views of
# libfuse's buffers, whose lengths vary with every small file, are cut from one type instead
_WINDOW_BYTES = 1 << 24                 # more than any FUSE request or reply carries
_Window = ctypes.c_char * _WINDOW_BYTES


def _buffer(ptr: Any, size: int) -> memoryview:
    """A writable view of size bytes of libfuse's buffer (no copy)."""
    addr = ctypes.cast(ptr, ctypes.c_void_p).value or 0
    if size <= _WINDOW_BYTES:
        return memoryview(_Window.from_address(addr)).cast("B")[:size]
    return memoryview((ctypes.c_char * size).from_address(addr)).cast("B")


def _fill_stat(st: Any, a: Attr) -> None:
    """libfuse's struct stat (zeroed) from an Attr, without mfusepy's dict in between."""
    st.st_mode = _TYPE[a.kind] | a.mode
    st.st_nlink = a.nlink
    st.st_size = a.size
    st.st_uid, st.st_gid = a.uid, a.gid
    st.st_blocks = (a.size + 511) // 512
    st.st_blksize = BLKSIZE
    sec, nsec = divmod(a.mtime_ns, 10**9)
    for ts in (st.st_atimespec, st.st_mtimespec, st.st_ctimespec):
        ts.tv_sec, ts.tv_nsec = sec, nsec


class _Fuse(mfusepy.FUSE):  # type: ignore[misc]
    """mfusepy's FUSE with the few calls it gets wrong for castore overridden: rename keeps
    its renameat2 flags, truncate its file handle, and read/write move bytes between the vfs
    and libfuse's buffers directly instead of through intermediate bytes objects."""

    def _wrapper(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        """Every callback passes here (mfusepy's error handling). libfuse's worker threads
        are not Python threads, so ctypes would create a Python thread state for each call
        and destroy it after (an mmap, munmap and gettid per request, and cold caches):
        the first call on a thread takes one more GIL-state reference that is never given
        back, so the thread keeps its state for every later call."""
        tid = threading.get_ident()
        if tid not in _PINNED:
            _PINNED.add(tid)
            _gil_ensure()
        return super()._wrapper(func, *args, **kwargs)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return int(self.operations.rename(old.decode(self.encoding, self.errors),
                                          new.decode(self.encoding, self.errors), flags) or 0)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        fh = fip.contents.fh if fip else None
        return int(self.operations.truncate(
            None if path is None else path.decode(self.encoding, self.errors), length, fh) or 0)

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        return int(self.operations.read_into(_buffer(buf, size), offset, fip.contents.fh))

    def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        # the vfs reads the data only during the call, so libfuse's buffer is passed as is
        # (mfusepy copies it into a bytes object first)
        return int(self.operations.write(None, _buffer(buf, size), offset, fip.contents.fh))

    def getattr_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        """stat, the most frequent request: the struct is filled from the Attr directly
        (mfusepy goes through a dict), and a missing path is returned as ENOENT without any
        exception (each new name a program creates is looked up first)."""
        fh = int(fip.contents.fh) if fip else None
        try:
            a = self.operations.attr(None if path is None else
                                     path.decode(self.encoding, self.errors), fh)
        except mfusepy.FuseOSError as exc:
            return -int(exc.errno or errno.EIO)
        if a is None:
            return -errno.ENOENT
        ctypes.memset(buf, 0, ctypes.sizeof(mfusepy.c_stat))
        _fill_stat(buf.contents, a)
        return 0

    def readlink(self, path: bytes, buf: Any, bufsize: int) -> int:
        """The target, NUL-terminated and cut to bufsize, copied into libfuse's buffer as it
        is (mfusepy makes a ctypes array type for each length first)."""
        target = self.operations.readlink(path.decode(self.encoding, self.errors)).encode(
            self.encoding, self.errors)[:max(0, bufsize - 1)] + b"\0"
        ctypes.memmove(buf, target, len(target))
        return 0

    def getxattr(self, path: bytes, name: bytes, value: Any, size: int, *args: Any) -> int:
        """Only user.* attributes exist: the others are refused here, without a trip
        through the vfs and an exception (the kernel asks for security.capability before
        every write to a file)."""
        if not name.startswith(b"user."):
            return -errno.ENODATA
        return int(super().getxattr(path, name, value, size, *args))

    def readdir_fuse_3(self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any,
                       flags: int) -> int:
        """Entries with offsets, so that libfuse 3.14 sends READDIRPLUS attributes (in its
        offset-less mode it drops them, and the kernel then looks up every entry again)."""
        if path is None:
            return -errno.ENOENT
        entries = self.operations.listing(path.decode(self.encoding, self.errors), buf or 0,
                                          offset == 0)
        plus = _FILL_DIR_PLUS if flags & _READDIR_PLUS else 0
        st = mfusepy.c_stat()
        size = ctypes.sizeof(st)
        for i in range(offset, len(entries)):
            name, a = entries[i]
            ctypes.memset(ctypes.byref(st), 0, size)
            if a is None:                # . and ..
                st.st_mode = _TYPE[Kind.DIR]
            else:
                _fill_stat(st, a)
            if filler(buf, name, st, i + 1, plus if a is not None else 0) != 0:
                break
        return 0


class _FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufvec(ctypes.Structure):       # libfuse's struct fuse_bufvec of one buffer
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t),
                ("off", ctypes.c_size_t), ("buf", _FuseBuf * 1)]


class _FileHandle(ctypes.Structure):       # struct file_handle, room for FUSE's 12 bytes
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_uint32 * 8)]


_AT_FDCWD = -100
_FILEID_INO64_GEN = 0x81                    # FUSE's handle: node id (2 words), generation
_libc = ctypes.CDLL(None, use_errno=True)
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int]
_name_to_handle_at.restype = ctypes.c_int


def node_id(path: bytes) -> int | None:
    """The FUSE node id the kernel holds for path on a castore mount (from its file handle,
    which FUSE builds from the node id: no request reaches the daemon for a path the kernel
    has just resolved). None if the kernel cannot say."""
    fh = _FileHandle()
    fh.handle_bytes = ctypes.sizeof(fh.f_handle)
    mount_id = ctypes.c_int()
    if _name_to_handle_at(_AT_FDCWD, path, ctypes.byref(fh), ctypes.byref(mount_id), 0):
        return None
    if fh.handle_type != _FILEID_INO64_GEN or fh.handle_bytes < 8:
        return None
    return (fh.f_handle[0] << 32) | fh.f_handle[1]


class _Notify:
    """libfuse3's cache notifications, bound once. Calls are refused (False) once the loop is
    about to end: struct fuse is freed with it."""

    def __init__(self, ops: CastoreOps) -> None:
        lib = mfusepy._libfuse
        self._store = lib.fuse_lowlevel_notify_store
        self._store.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                                ctypes.POINTER(_FuseBufvec), ctypes.c_int]
        self._store.restype = ctypes.c_int
        self._ops = ops
        self._mutex = threading.Lock()
        self._closed = False
        self._path = lib.fuse_invalidate_path
        self._path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._path.restype = ctypes.c_int
        self._session_of = lib.fuse_get_session
        self._session_of.argtypes = [ctypes.c_void_p]
        self._session_of.restype = ctypes.c_void_p
        entry_args = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t]
        self._inval_entry = lib.fuse_lowlevel_notify_inval_entry
        self._inval_entry.argtypes = entry_args
        self._inval_entry.restype = ctypes.c_int
        # expiring (libfuse 3.12, Linux 6.2) makes the kernel look the name up again without
        # dropping a directory some process is in; plain invalidation is the fallback
        self._expire_entry = getattr(lib, "fuse_lowlevel_notify_expire_entry", None)
        if self._expire_entry is not None:
            self._expire_entry.argtypes = entry_args
            self._expire_entry.restype = ctypes.c_int

    def close(self, timeout: float) -> None:
        got = self._mutex.acquire(timeout=timeout)
        self._closed = True
        if got:
            self._mutex.release()

    def path(self, path: bytes) -> bool:
        """Drop the attributes and cached pages of the node at path. False when the kernel
        does not hold it (ENOENT) or the mount is going away."""
        with self._mutex:
            ptr = self._ops._fuse_ptr
            if self._closed or not ptr:
                return False
            return int(self._path(ptr, path)) == 0

    def store(self, path: bytes, offset: int, data: bytes | bytearray) -> bool:
        """Put data into the kernel's page cache of the file at path (a path the kernel
        holds, on this mount) at offset. Safe inside an operation on that file other than
        READ (which holds the page locks this waits for)."""
        nid = node_id(path)
        if nid is None:
            return False
        # its address, not a copy (bytes are not writable: c_char_p points into them)
        if isinstance(data, bytearray):
            addr = ctypes.addressof(ctypes.c_char.from_buffer(data))
        else:
            addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
        vec = _FuseBufvec(1, 0, 0)
        vec.buf[0].size = len(data)
        vec.buf[0].mem = addr
        vec.buf[0].fd = -1
        with self._mutex:
            ptr = self._ops._fuse_ptr
            if self._closed or not ptr:
                return False
            rc = int(self._store(self._session_of(ptr), nid, offset, ctypes.byref(vec), 0))
        if rc:
            log.debug("pushing %r into the page cache: %s", path, errno.errorcode.get(-rc, rc))
        return rc == 0

    def entry(self, parent_ino: int, name: bytes) -> None:
        """Make the kernel look name up again in directory parent_ino (a libfuse node id)."""
        with self._mutex:
            ptr = self._ops._fuse_ptr
            if self._closed or not ptr:
                return
            se = self._session_of(ptr)
            rc = -errno.ENOSYS
            if self._expire_entry is not None:
                rc = int(self._expire_entry(se, parent_ino, name, len(name)))
            if rc in (-errno.ENOSYS, -errno.EINVAL):
                rc = int(self._inval_entry(se, parent_ino, name, len(name)))
        if rc not in (0, -errno.ENOENT):
            log.debug("invalidating %r in node %d: %s", name, parent_ino,
                      errno.errorcode.get(-rc, rc))


class Invalidator:
    """Drops the kernel's caches of paths that ops from other peers, or from this peer's
    client API, changed, so that readers here see the change at once, not after
    ATTR_TIMEOUT: attributes and pages of the nodes (fuse_invalidate_path) and the names
    that appeared, moved or went away (expired in their directory, which is found by its
    inode number: without use_ino, st_ino is the libfuse node id). Ops are queued by the
    repo's listener and handled in a thread of its own: the thread that applied them never
    waits, and no notification is sent from inside a FUSE operation (libfuse can deadlock
    then). Ops made through the mount are left out: the kernel saw them happen."""

    def __init__(self, repo: Repo, notify: _Notify, mountpoint: str) -> None:
        self.repo = repo
        self.mountpoint = os.fsencode(mountpoint)
        self._notify = notify
        self._ops: list[Op] = []
        self._local: list[Op] = []       # made here through the client API
        self._everything = False
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self.sent = 0                    # notifications sent (read by debuggers)
        self._thread = threading.Thread(target=self._run, name="castore-invalidate",
                                        daemon=True)

    def start(self) -> None:
        self.repo.add_listener(self.on_ops)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending (before the FUSE loop ends); never blocks longer than timeout."""
        try:
            self.repo.ns.listeners.remove(self.on_ops)
        except ValueError:
            pass
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._notify.close(timeout)
        self._thread.join(timeout)

    def on_ops(self, ops: list[Op], local: bool) -> None:
        """The repo listener: queue the ops not made through this mount (quick, never
        raises)."""
        if local and drive_commits():
            return                  # the kernel saw these happen
        with self._wake:
            (self._local if local else self._ops).extend(ops)
            self._wake.notify_all()

    def refresh_top(self) -> None:
        """The whole tree was replaced (a snapshot was loaded): refresh the root's entries."""
        with self._wake:
            self._everything = True
            self._wake.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                while not (self._ops or self._local or self._everything or
                           self._stop.is_set()):
                    self._wake.wait(1.0)
                batch, self._ops = self._ops[:INVALIDATE_BATCH], self._ops[INVALIDATE_BATCH:]
                local, self._local = (self._local[:INVALIDATE_BATCH],
                                      self._local[INVALIDATE_BATCH:])
                everything, self._everything = self._everything, False
            try:
                if everything:
                    self._send(top_level_paths(self.repo))
                if batch:
                    self._send(changed_paths(self.repo, batch))
                if local:
                    self._send(changed_paths(self.repo, local, local=True))
            except Exception:   # a cache left to its timeout, never a dead thread
                log.exception("invalidating the drive's kernel caches failed")

    def _send(self, changed: Changed) -> None:
        log.debug("invalidating %d nodes and %d names", len(changed.nodes), len(changed.names))
        known: dict[bytes, int | None] = {b"/": 1}      # FUSE_ROOT_ID
        for path in sorted(changed.nodes, key=len, reverse=True):
            if self._stop.is_set():
                return
            if self._notify.path(path):
                self.sent += 1
                known.setdefault(path, None)
        for parent, name in sorted(changed.names):
            if self._stop.is_set():
                return
            if parent not in known:
                continue                  # the kernel holds no entries of that directory
            ino = known[parent]
            if ino is None:
                try:               # a stat through the mount, from this thread (not an op)
                    ino = known[parent] = os.lstat(self.mountpoint + parent).st_ino
                except OSError:
                    known.pop(parent)
                    continue
            self._notify.entry(ino, name)
            self.sent += 1


class Mount:
    """A mounted drive, served by a FUSE loop in its own thread."""

    def __init__(self, vfs: Vfs, ops: CastoreOps, mountpoint: str,
                 thread: threading.Thread, errors: list[BaseException]) -> None:
        self.vfs = vfs
        self.mountpoint = mountpoint
        self._ops = ops
        self._thread = thread
        self._errors = errors
        self._dev: int | None = None
        self._stopped = False
        self.invalidator: Invalidator | None = None

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Unmount (lazily if busy), end the FUSE loop, and commit what open files still
        hold. Idempotent; never raises for an already unmounted drive."""
        if self._stopped:
            return
        self._stopped = True
        lazy = False
        if self.invalidator is not None:
            self.invalidator.stop()
        try:
            how = mounts.unmount(self.mountpoint) if mounts.find(self.mountpoint) else \
                "not mounted"
            lazy = how == "lazily unmounted"
            if lazy:
                self._abort_connection()
        finally:
            # After a lazy unmount the loop may only learn it should end from a request
            # that never comes: do not wait long; the process exit closes /dev/fuse, which
            # aborts the connection (descriptors still open then get ENOTCONN).
            self._thread.join(1.0 if lazy else UNMOUNT_JOIN)
            if self._thread.is_alive():
                self._exit_loop()
                self._thread.join(1.0)
            self.vfs.close()
        log.info("castore drive at %s stopped", self.mountpoint)

    def _abort_connection(self) -> None:
        """A lazily detached mount still serves open descriptors: abort its connection so
        they fail at once (ENOTCONN) and the loop ends."""
        if self._dev is None:
            return
        try:
            with open(f"/sys/fs/fuse/connections/{os.minor(self._dev)}/abort", "w") as fh:
                fh.write("1")
        except OSError as exc:
            log.debug("cannot abort the FUSE connection: %s", exc)
            self._exit_loop()

    def _exit_loop(self) -> None:
        ptr = self._ops._fuse_ptr
        if ptr:
            lib = mfusepy._libfuse
            lib.fuse_exit.argtypes = [ctypes.c_void_p]
            lib.fuse_exit.restype = None
            lib.fuse_exit(ptr)
            try:                  # fuse_exit only sets a flag: wake a worker with a request
                os.stat(os.path.join(self.mountpoint, f".castore-wake-{uuid.uuid4().hex}"))
            except OSError:
                pass


MAX_THREADS = 10                # libfuse worker threads at most


def start_mount(repo: Repo, mountpoint: str, allow_other: bool = False) -> Mount:
    """Mount the repo's namespace at mountpoint and return once it serves. A stale castore
    mount left there by a killed daemon is cleaned up first. Raises MountError.

    Signal handlers must already be installed in the main thread (libfuse takes over any
    signal still at its default when the loop starts)."""
    mp = os.path.abspath(mountpoint)
    mounts.clear_stale(mp)
    try:
        os.makedirs(mp, exist_ok=True)
    except OSError as exc:
        raise MountError(f"cannot use {mp} as a mountpoint: {exc.strerror}") from None
    vfs = Vfs(repo)
    ops = CastoreOps(vfs, mp)
    ops.notify = _Notify(ops)
    errors: list[BaseException] = []
    # max_idle_threads: every worker stays (libfuse's default, "unlimited", made explicit:
    # libfuse 3.14 takes that default for an invalid value and says so at every mount)
    options: dict[str, Any] = dict(foreground=True, raw_fi=True, fsname="castore",
                                   subtype="castore", max_threads=MAX_THREADS,
                                   max_idle_threads=MAX_THREADS)
    if allow_other:
        options["allow_other"] = True
    if allow_other or os.geteuid() != 0:
        # The kernel checks permissions from the attributes: it then asks for a directory's
        # attributes again after every entry made in it (one more request per file
        # created). A mount by root without allow_other serves root alone, who passes
        # those checks anyway (CastoreOps.access keeps the one rule left: x bits to run).
        options["default_permissions"] = True

    def serve() -> None:
        try:
            _Fuse(ops, mp, **options)
        except BaseException as exc:  # reported by start_mount, or ends the daemon
            errors.append(exc)
            log.error("the FUSE loop for %s ended with an error: %r", mp, exc)

    thread = threading.Thread(target=serve, name="castore-fuse", daemon=True)
    thread.start()
    mount = Mount(vfs, ops, mp, thread, errors)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if not thread.is_alive():
            vfs.close()
            raise MountError(f"could not mount the drive at {mp}: "
                             f"{errors[0] if errors else 'the FUSE loop ended'}")
        if ops._ready.is_set() and mounts.find(mp) is not None:
            try:
                mount._dev = os.stat(mp).st_dev
                break
            except OSError:
                pass
        time.sleep(0.02)
    else:
        mount.stop()
        raise MountError(f"the drive at {mp} did not come up within {MOUNT_TIMEOUT:.0f} s")
    mounts.raise_readahead(mp)
    vfs.mounted()
    mount.invalidator = Invalidator(repo, ops.notify, mp)
    mount.invalidator.start()
    log.info("castore drive mounted at %s", mp)
    return mount


__all__ = ["CastoreOps", "Mount", "MountError", "errno_of", "start_mount"]
