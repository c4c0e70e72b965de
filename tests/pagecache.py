"""Page-cache residency of a file's pages, read with mincore(2), and dropping them (a plain
module: tests import it)."""
from __future__ import annotations

import mmap
import os
from pathlib import Path

from castore.store.lmdb import resident_share

PAGE = mmap.PAGESIZE


def resident_fraction(path: Path, start: int, end: int) -> float:
    """Fraction of the file's pages in [start, end) that are in the page cache (opening the
    file: on the drive an open may hand a small file to the kernel)."""
    with open(path, "rb") as f:
        return resident_share(f.fileno(), end, start)


def drop_pages(path: Path) -> None:
    """Ask the kernel to drop the file's clean pages that no process maps."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
