"""Staging: the bytes written to a file through the drive since it was opened, kept in memory
while small and in a sparse, unnamed temporary file under HOME/staging once larger, so that a
file of any size is written without being held in memory. The temporary file has no name
(O_TMPFILE), so nothing is left behind when the daemon is killed.

Not thread-safe: the owning OpenFile serializes access. Imports nothing of castore.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
from pathlib import Path

SPILL = 1 << 20          # bytes kept in memory before moving to a temporary file


class Staging:
    """A sparse byte array: pwrite, pread (holes and the tail read as zeros), truncate."""

    def __init__(self, directory: Path, spill: int = SPILL) -> None:
        self._dir = directory
        self._spill = spill
        self._buf: bytearray | None = bytearray()
        self._fd: int | None = None
        self.length = 0

    @property
    def fd(self) -> int | None:
        """The temporary file's descriptor once spilled (None while in memory)."""
        return self._fd

    def _to_file(self) -> int:
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(self._dir, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except (OSError, AttributeError):          # a file system without O_TMPFILE
            fd, name = tempfile.mkstemp(dir=self._dir, prefix="staging-")
            os.unlink(name)
        assert self._buf is not None
        if self._buf:
            os.pwrite(fd, self._buf, 0)
        os.ftruncate(fd, self.length)
        self._buf = None
        self._fd = fd
        return fd

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        end = offset + len(data)
        if self._buf is not None and end > self._spill:
            self._to_file()
        if self._buf is not None:
            if offset > len(self._buf):
                self._buf.extend(bytes(offset - len(self._buf)))
            self._buf[offset:end] = data
        else:
            assert self._fd is not None
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        if end > self.length:
            self.length = end

    def pread_into(self, dest: memoryview, offset: int) -> None:
        """Fill dest with the bytes at offset; anything past what was written is zero."""
        n = len(dest)
        if self._buf is not None:
            avail = max(0, min(n, len(self._buf) - offset))
            if avail:
                dest[:avail] = self._buf[offset:offset + avail]
            if avail < n:
                dest[avail:] = bytes(n - avail)
            return
        assert self._fd is not None
        got = 0
        while got < n:
            k = os.preadv(self._fd, [dest[got:]], offset + got)
            if k <= 0:
                dest[got:] = bytes(n - got)
                return
            got += k

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def truncate(self, length: int) -> None:
        if self._buf is not None:
            if length > self._spill:
                self._to_file()
            else:
                del self._buf[length:]
        if self._fd is not None:
            os.ftruncate(self._fd, length)
        self.length = length

    def punch(self, start: int, end: int) -> None:
        """Free [start, end) (it reads as zeros afterwards): the bytes are kept elsewhere."""
        if self._fd is None or end <= start:
            return
        try:
            _punch_hole(self._fd, start, end - start)
        except OSError:       # not supported here: the bytes just stay on disk until close
            pass

    def map(self) -> memoryview:
        """A read-only view of [0, length) (an mmap once spilled). Release it before any
        further write or truncate."""
        if self._buf is not None:
            return memoryview(self._buf).toreadonly()
        assert self._fd is not None
        if self.length == 0:
            return memoryview(b"")
        m = mmap.mmap(self._fd, self.length, prot=mmap.PROT_READ)
        m.madvise(mmap.MADV_SEQUENTIAL)
        return memoryview(m)

    def close(self) -> None:
        self._buf = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_FALLOC_KEEP_SIZE_PUNCH_HOLE = 0x01 | 0x02
_libc: ctypes.CDLL | None = None


def _punch_hole(fd: int, offset: int, length: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if _libc.fallocate(fd, _FALLOC_KEEP_SIZE_PUNCH_HOLE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
