"""Page-cache residency of a file's pages, read with mincore(2), and dropping them (a plain
module: tests import it)."""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
PAGE = mmap.PAGESIZE


def resident_fraction(path: Path, start: int, end: int) -> float:
    """Fraction of the file's pages in [start, end) that are in the page cache."""
    start -= start % PAGE
    length = end - start
    pages = (length + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        # a private map is writable for ctypes, and mincore reports the file's cache for it
        m = mmap.mmap(f.fileno(), start + length, access=mmap.ACCESS_COPY)
        view = (ctypes.c_char * len(m)).from_buffer(m)
        try:
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(view) + start),
                             ctypes.c_size_t(length), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del view
            m.close()
    return sum(v & 1 for v in vec) / pages


def drop_pages(path: Path) -> None:
    """Ask the kernel to drop the file's clean pages that no process maps."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
