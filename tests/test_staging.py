"""castore.vfs.staging (one layer): the staging array against a model under random writes,
reads, truncations and frees, and the reuse of freed blocks of its file."""
from __future__ import annotations

import os
import random
from pathlib import Path

from castore.vfs import staging
from castore.vfs.staging import BLOCK, Staging

_FLIP = bytes.maketrans(b"\0\xff", b"\xff\0")


def test_random_operations_match_a_model(tmp_path: Path) -> None:
    rnd = random.Random(7)
    for spill in (0, 100_000):
        s = Staging(tmp_path, spill=spill)
        model = bytearray()
        loose = bytearray(8 * BLOCK)       # 0xff: freed, never read again, so not compared
        try:
            for _ in range(400):
                op = rnd.random()
                if op < 0.55:
                    off = rnd.randrange(0, 6 * BLOCK)
                    data = rnd.randbytes(rnd.choice([1, 4096, 100_000, BLOCK + 17]))
                    s.pwrite(data, off)
                    if off > len(model):
                        model.extend(bytes(off - len(model)))
                    model[off:off + len(data)] = data
                    loose[off:off + len(data)] = bytes(len(data))
                elif op < 0.7:
                    n = rnd.randrange(0, 7 * BLOCK)
                    s.truncate(n)
                    del model[n:]
                    model.extend(bytes(n - len(model)))
                    loose[n:] = bytes(len(loose) - n)
                elif op < 0.8 and model:
                    a = rnd.randrange(0, len(model))
                    b = rnd.randrange(a, len(model) + 1)
                    s.punch(a, b)
                    if s.spilled:
                        loose[a:b] = b"\xff" * (b - a)
                else:
                    off = rnd.randrange(0, len(model) + 10)
                    n = rnd.randrange(0, 2 * BLOCK)
                    got = s.pread(off, n)
                    want = model[off:off + n].ljust(n, b"\0")
                    keep = int.from_bytes(loose[off:off + n].ljust(n, b"\0").translate(_FLIP))
                    assert int.from_bytes(got) & keep == int.from_bytes(want) & keep
                    assert s.length == len(model)
        finally:
            s.close()


def test_a_sequential_write_reuses_the_blocks_it_frees(tmp_path: Path) -> None:
    """Bytes freed as soon as they are kept elsewhere (a stream absorbing its chunks) make
    room for the next ones: the file stays a few blocks long however much is written."""
    s = Staging(tmp_path, spill=0)
    try:
        piece = os.urandom(BLOCK // 2)
        for i in range(64):
            s.pwrite(piece, i * len(piece))
            if i >= 4:
                s.punch(0, (i - 2) * len(piece))
        assert s._top <= 4 and s.map() is None
        assert s.pread(63 * len(piece), len(piece)) == piece
        assert s.read_into(memoryview(bytearray(BLOCK)), 64 * len(piece) - 10) == 10
    finally:
        s.close()


def test_blocks_freed_past_what_is_kept_go_back_to_the_kernel(tmp_path: Path,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(staging, "KEEP_FREE", 2)
    s = Staging(tmp_path, spill=0)
    try:
        s.pwrite(os.urandom(BLOCK), 0)        # moves blocks out of place from here on
        s.punch(0, BLOCK)
        s.pwrite(os.urandom(6 * BLOCK), BLOCK)
        s.punch(0, 7 * BLOCK)
        assert len(s._free) == 2 and len(s._holes) == 4
        st = os.fstat(s._fd)                  # type: ignore[arg-type]
        assert st.st_blocks * 512 <= 3 * BLOCK
    finally:
        s.close()


def test_map_shows_the_bytes_until_blocks_move(tmp_path: Path) -> None:
    s = Staging(tmp_path, spill=0)
    try:
        data = os.urandom(3 * BLOCK + 5)
        s.pwrite(data, 0)
        s.truncate(BLOCK + 3)
        s.truncate(2 * BLOCK)
        view = s.map()
        assert view is not None and bytes(view) == data[:BLOCK + 3] + bytes(BLOCK - 3)
        del view
    finally:
        s.close()


def test_a_block_goes_only_once_all_of_it_is_freed(tmp_path: Path) -> None:
    """Frees that end inside a block add up, overlapping or not; a write in between makes
    the block whole again."""
    s = Staging(tmp_path, spill=0)
    try:
        data = os.urandom(2 * BLOCK)
        s.pwrite(data, 0)
        s.punch(0, 600_000)
        s.punch(0, 600_000)
        s.punch(100, 500_000)
        assert s.pread(600_000, BLOCK - 600_000) == data[600_000:BLOCK]
        s.pwrite(data[:10], 0)
        s.punch(600_000, BLOCK + 5)
        assert s.pread(0, 10) == data[:10] and 0 in s._blocks
        s.punch(0, 600_000)
        assert 0 not in s._blocks and 1 in s._blocks
    finally:
        s.close()
