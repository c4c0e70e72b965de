"""ChunkReader (one layer, over an in-memory ChunkSource): what it reads and the readahead it
asks for. A window costs even when cached, so the last chunk of a file asks for none and a
file's window is no larger than the file."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from castore.files import Manifest
from castore.ids import ChunkId
from castore.store.readahead import WINDOW, Readahead
from castore.vfs.readcache import Budget, ChunkReader


class Source:
    def __init__(self, chunks: dict[ChunkId, bytes]) -> None:
        self.chunks = chunks
        self.asked: list[tuple[ChunkId, object]] = []
        self.filled: list[ChunkId] = []

    def probe(self, cid: ChunkId, readahead: object) -> bytes | None:
        self.asked.append((cid, readahead))
        return self.chunks[cid]

    def copy(self, cid: ChunkId, offset: int, dest: memoryview, readahead: object
             ) -> int | None:
        raise AssertionError("every chunk here comes back from probe")

    def fill(self, cid: ChunkId, offset: int, dest: memoryview) -> None:
        self.filled.append(cid)
        dest[:] = self.chunks[cid][offset:offset + len(dest)]


def reader_of(parts: list[bytes], pool: ThreadPoolExecutor) -> tuple[ChunkReader, Source]:
    ids = [ChunkId.of(p) for p in parts]
    src = Source(dict(zip(ids, parts)))
    manifest = Manifest(tuple(ids), tuple(len(p) for p in parts))
    return ChunkReader(manifest, src, pool, Budget(), Readahead.for_file(manifest.size)), src


def test_a_one_chunk_file_asks_for_no_readahead() -> None:
    with ThreadPoolExecutor(2) as pool:
        reader, src = reader_of([b"x" * 3000], pool)
        buf = bytearray(4096)
        assert reader.read_into(0, memoryview(buf)) == 3000
        assert bytes(buf[:3000]) == b"x" * 3000
        assert [ra for _, ra in src.asked] == [None]


def test_only_the_last_chunk_goes_without_readahead() -> None:
    parts = [os.urandom(1000) for _ in range(3)]
    with ThreadPoolExecutor(2) as pool:
        reader, src = reader_of(parts, pool)
        buf = bytearray(3000)
        assert reader.read_into(0, memoryview(buf)) == 3000
        assert bytes(buf) == b"".join(parts)
        reader.close()
    by_id = dict(src.asked)
    ids = [ChunkId.of(p) for p in parts]
    assert isinstance(by_id[ids[0]], Readahead) and isinstance(by_id[ids[1]], Readahead)
    assert by_id[ids[2]] is None


def test_a_files_window_is_no_larger_than_the_file() -> None:
    assert Readahead.for_file(3000).window == 3000
    assert Readahead.for_file(1 << 40).window == WINDOW
    Readahead.for_file(0).after(b"abc")         # no window: nothing to ask, no error


def test_read_once_copies_across_chunks_and_keeps_nothing() -> None:
    """A small file handed whole to the kernel is read in one pass: each chunk verified and
    copied in one step, no readahead asked for, nothing kept for later reads."""
    parts = [os.urandom(1000) for _ in range(3)]
    with ThreadPoolExecutor(2) as pool:
        reader, src = reader_of(parts, pool)
        buf = bytearray(2000)
        assert reader.read_once(300, memoryview(buf)) == 2000
        assert bytes(buf) == b"".join(parts)[300:2300]
        assert reader.read_once(2900, memoryview(buf)) == 100
        assert bytes(buf[:100]) == parts[2][900:]
        assert reader.read_once(3000, memoryview(buf)) == 0
        assert src.asked == [] and reader._chunks == {}
        assert src.filled == [ChunkId.of(p) for p in parts] + [ChunkId.of(parts[2])]
