"""Chunk compression: zstd when it saves space, raw bytes when it doesn't.

The codec tag is kept beside the bytes (in chunk metadata, and on the wire), never inside them,
so raw chunks are stored without a copy. A chunk's id is always the BLAKE3 of its raw bytes.
"""
from __future__ import annotations

import threading

import zstandard

from castore.errors import IntegrityError

RAW = 0
ZSTD = 1
DEFAULT_LEVEL = 1
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


PROBE_FROM = 256 << 10      # chunks at least this large are sampled before compressing
_PROBE = 8 << 10


def _incompressible(data: bytes | memoryview, level: int) -> bool:
    """True when samples from the start, middle and end of data all fail to shrink: then
    compressing it whole (about 1 ms per MiB here) would be wasted."""
    view = memoryview(data)
    n = len(view)
    comp = _compressor(level)
    for start in (0, n // 2 - _PROBE // 2, n - _PROBE):
        if len(comp.compress(view[start:start + _PROBE])) < _PROBE - (_PROBE >> 5):
            return False
    return True


def encode(data: bytes | memoryview, level: int) -> tuple[int, bytes | memoryview]:
    """Return (codec, stored bytes). level 0 turns compression off. Thread-safe; releases the GIL."""
    if level <= 0 or len(data) < 128:
        return RAW, data
    if len(data) >= PROBE_FROM and _incompressible(data, level):
        return RAW, data
    packed = _compressor(level).compress(data)
    # keep the compressed form only when it saves at least 1/64 of the size
    if len(packed) + (len(data) >> 6) < len(data):
        return ZSTD, packed
    return RAW, data


def decode(codec: int, stored: bytes | memoryview, raw_len: int) -> bytes | memoryview:
    """Return the raw bytes of a stored chunk. Raises IntegrityError on undecodable bytes."""
    if codec == RAW:
        return stored
    if codec == ZSTD:
        try:
            return _decompressor().decompress(stored, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"compressed chunk does not decode: {exc}") from None
    raise IntegrityError(f"unknown chunk codec {codec}")
