"""Sequential readahead for chunk reads from the LMDB map.

The environment is opened without kernel readahead (random metadata lookups stay cheap), and
py-lmdb touches every page of a value when it is read, so a cold 1 MiB chunk arrives as 256
synchronous 4 KiB page faults: about 40 MB/s here, against the disk's ~400 MB/s. The chunks of
one file are mostly stored one after the other in data.mdb (they are committed in file order),
so after each chunk read a Readahead asks the kernel (madvise WILLNEED, asynchronous) for the
next few MiB of the map. Measured here: 45 -> 560 MB/s for a cold 1 GiB file. Wrong guesses
cost only some extra reading.

The kernel reads at most max(read_ahead_kb, max_sectors_kb) of one WILLNEED (8 MiB on this
machine's disk) and drops the rest, so a window is asked for in pieces of ASK bytes (a 32 MiB
window asked at once arrived as 25% of it, and a cold read ran at 260 MB/s). Imports nothing
of castore.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

WINDOW = 8 << 20            # bytes of the map asked for ahead of the last chunk read
_PAGE = 4096
ASK = 512 << 10             # bytes per madvise: the kernel reads at most max(read_ahead_kb,
                            # max_sectors_kb) of one WILLNEED and drops the rest of it
_MADV_WILLNEED = 3


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None


_libc = _load_libc()


def address(view: bytes | memoryview) -> tuple[int, int]:
    """(address, length) of a buffer's memory, without copying or touching it."""
    pb = _PyBuffer()
    if _get_buffer(view, ctypes.byref(pb), 0) != 0:      # pragma: no cover
        raise ValueError("not a buffer")
    try:
        return int(pb.buf or 0), int(pb.len)
    finally:
        _release_buffer(ctypes.byref(pb))


class Readahead:
    """One sequential reader's window ahead in the map. Cheap when the window is already
    asked for; safe to share between threads (a race only repeats a hint)."""

    __slots__ = ("window", "_until")

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._until = 0

    @classmethod
    def for_file(cls, size: int) -> Readahead:
        """The readahead of one file of `size` bytes: its window no larger than the file.
        Asking for a window costs even when it is cached (about 235 us for 8 MiB here), so
        a small file must not pay for a large one."""
        return cls(min(WINDOW, size))

    def after(self, view: bytes | memoryview) -> None:
        """view was just read from the map: ask for the bytes that follow it."""
        if _libc is None or not len(view) or self.window <= 0:
            return
        try:
            addr, n = address(view)
        except (ValueError, TypeError):
            return
        end = addr + n
        ahead = self._until - end
        if self.window // 2 <= ahead <= self.window:
            return                              # at least half a window is still on its way
        start = self._until if 0 < ahead < self.window else end
        start &= ~(_PAGE - 1)
        stop = end + self.window
        for at in range(start, stop, ASK):
            _libc.madvise(at, min(ASK, stop - at), _MADV_WILLNEED)
        self._until = stop
