"""StreamWriter (one layer, over a real LMDB store and an in-memory file): the chunks of a file
being written are cut while it grows, and the same as cutting it whole; a step waits for a
chunk's worth of new bytes, since each one cuts the unconsumed tail again."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from castore import chunking
from castore.files import ChunkPipeline
from castore.ids import ChunkId
from castore.store.lmdb import LmdbEnv, LmdbStore
from castore.vfs.stream import STEP, StreamWriter


def test_small_writes_are_cut_in_steps_of_a_chunk(tmp_path: Path) -> None:
    data = os.urandom(12 << 20)
    reads: list[int] = []

    def read_into(offset: int, dest: memoryview) -> int:
        n = max(0, min(len(dest), len(data) - offset))
        dest[:n] = data[offset:offset + n]
        reads.append(n)
        return n

    env = LmdbEnv(tmp_path / "db")
    try:
        store = LmdbStore(env, level=0)
        with ThreadPoolExecutor(2) as pool:
            stream = StreamWriter(0, read_into, ChunkPipeline(env, store, pool))
            for end in range(64 << 10, len(data) + 1, 64 << 10):
                stream.advance(end)         # as FUSE writes of 64 KiB arrive
                time.sleep(0.001)
            ids, lengths = stream.take(len(data))
        whole = [ChunkId.of(c) for c in chunking.split(data)]
        assert ids == whole
        assert sum(lengths) == len(data)
        assert len(reads) <= len(data) // STEP + 3, f"{len(reads)} steps for 12 MiB"
    finally:
        env.close()
