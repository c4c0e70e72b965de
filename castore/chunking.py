"""Content-defined chunking (FastCDC, min/avg/max 256 KiB / 1 MiB / 4 MiB).

A cut point depends only on the bytes from the chunk start to at most max_size past it, so a
stream is chunked exactly as the whole file would be by keeping a bounded buffer (StreamChunker).
Pure: no storage, no I/O beyond reading the file handed in.
"""
from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator

import fastcdc

log = logging.getLogger(__name__)

MIN_SIZE = 256 << 10
AVG_SIZE = 1 << 20
MAX_SIZE = 4 << 20

COMPILED = getattr(fastcdc, "fastcdc_cy", None) is not None and \
    fastcdc.fastcdc is getattr(fastcdc.fastcdc_cy, "fastcdc_cy", None)
if not COMPILED:  # pragma: no cover - depends on the installed wheel
    log.warning("castore: the compiled FastCDC chunker is missing; chunking runs in pure Python "
                "at about 12 MB/s. Reinstall the 'fastcdc' wheel for your platform.")


def chunker_name() -> str:
    return "fastcdc-cython" if COMPILED else "fastcdc-pure-python (slow)"


def cut(data: bytes | bytearray | memoryview | mmap.mmap) -> Iterator[tuple[int, int]]:
    """Yield (offset, length) of each chunk of data; the lengths add up to len(data)."""
    if len(data) == 0:
        return
    if len(data) <= MIN_SIZE:
        yield 0, len(data)
        return
    for c in fastcdc.fastcdc(data, MIN_SIZE, AVG_SIZE, MAX_SIZE):
        yield c.offset, c.length


def split(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """Yield the chunks of data as memoryviews into it."""
    view = memoryview(data)
    for off, length in cut(view):
        yield view[off:off + length]


class FileChunks:
    """The chunks of a regular file, cut from an mmap of it (no copy of the whole file in memory).

    Use as a context manager; the memoryviews yielded are valid until it closes.
    """

    def __init__(self, fd: int, size: int) -> None:
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        if size > 0:
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            self._map.madvise(mmap.MADV_SEQUENTIAL)
            self._view = memoryview(self._map)

    def __iter__(self) -> Iterator[memoryview]:
        if self._view is None:
            return
        for off, length in cut(self._view):
            yield self._view[off:off + length]

    def __enter__(self) -> FileChunks:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._view is not None:
            self._view.release()
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a slice; the map closes when it is freed
                pass


class StreamChunker:
    """Chunk bytes fed in pieces, with the same cut points as chunking the whole stream at once.

    Holds at most about 2 * MAX_SIZE bytes. `feed()` and `finish()` return completed chunks.
    """

    def __init__(self, window: int = 2 * MAX_SIZE) -> None:
        self._buf = bytearray()
        self._window = max(window, MAX_SIZE + 1)

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        self._buf += data
        if len(self._buf) < self._window:
            return []
        return self._drain(final=False)

    def finish(self) -> list[bytes]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[bytes]:
        spans = list(cut(self._buf))
        if not final:
            spans = spans[:-1]          # the last cut may move once more bytes arrive
        out = [bytes(self._buf[o:o + n]) for o, n in spans]
        consumed = sum(n for _, n in spans)
        del self._buf[:consumed]
        return out


def read_file_chunks(path: str | os.PathLike[str]) -> Iterator[bytes]:
    """Convenience for tests and tools: the chunks of a file as bytes."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with FileChunks(f.fileno(), size) as chunks:
            for c in chunks:
                yield bytes(c)
