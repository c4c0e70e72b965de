"""The store's use of the page cache. Drop-behind of bulk commits: the pages a large commit of
chunk bytes appends to data.mdb leave the page cache once they are durable; small commits,
namespace commits and chunks handed to replication keep theirs. Residency is read with
mincore(2). A small store is read whole when a walk starts (prewarm), and readahead windows
arrive whole."""
from __future__ import annotations

import errno
import mmap
import os
import time
from pathlib import Path

import pytest

from castore.ids import ChunkId
from castore.store import lmdb as lmdb_mod
from castore.store.lmdb import LmdbEnv, LmdbStore, LmdbTxn
from castore.store.readahead import Readahead
from pagecache import PAGE, drop_pages, resident_fraction


def append_chunks(env: LmdbEnv, store: LmdbStore, total: int) -> tuple[int, int]:
    """Put `total` bytes of random chunks in one commit; return the byte range it appended."""
    before = (int(env.env.info()["last_pgno"]) + 1) * PAGE
    items = []
    for _ in range(total >> 20):
        data = os.urandom(1 << 20)
        items.append((ChunkId.of(data), data))
    assert store.put_many(items) == len(items)
    after = (int(env.env.info()["last_pgno"]) + 1) * PAGE
    return before, after


@pytest.mark.parametrize("drop", [True, False])
def test_a_bulk_commit_leaves_the_page_cache(tmp_path: Path, drop: bool) -> None:
    env = LmdbEnv(tmp_path / "db")
    try:
        if not drop:
            env.drop_behind = 0
        store = LmdbStore(env, level=0)
        start, end = append_chunks(env, store, 16 << 20)
        assert end - start >= 16 << 20
        frac = resident_fraction(tmp_path / "db" / "data.mdb", start, end)
        if drop:
            assert frac < 0.1, f"{frac:.0%} of the appended pages are still cached"
        else:
            assert frac > 0.9, f"only {frac:.0%} of the appended pages are cached"
        # the data reads back whole from disk
        with env.env.begin() as txn:
            assert txn.stat(env.dbs["chunks"])["entries"] == 16
        assert all(len(store.get(cid)) == 1 << 20 for cid in store.ids())
    finally:
        env.close()


def test_a_small_commit_keeps_its_pages(tmp_path: Path) -> None:
    env = LmdbEnv(tmp_path / "db")
    try:
        store = LmdbStore(env, level=0)
        start, end = append_chunks(env, store, 4 << 20)
        assert resident_fraction(tmp_path / "db" / "data.mdb", start, end) > 0.9
    finally:
        env.close()


def test_chunks_handed_to_replication_stay_cached(tmp_path: Path) -> None:
    """Replication reads a commit's new chunks right after it: those pages are kept."""
    env = LmdbEnv(tmp_path / "db")
    handed: list[ChunkId] = []
    env.on_commit = handed.extend
    try:
        store = LmdbStore(env, level=0)
        start, end = append_chunks(env, store, 16 << 20)
        assert len(handed) == 16
        assert resident_fraction(tmp_path / "db" / "data.mdb", start, end) > 0.9
    finally:
        env.close()


def test_a_large_namespace_commit_keeps_its_pages(tmp_path: Path) -> None:
    """Only bulk (chunk) commits drop behind: lookups read namespace pages next."""
    env = LmdbEnv(tmp_path / "db")
    try:
        before = (int(env.env.info()["last_pgno"]) + 1) * PAGE

        def run(t: LmdbTxn) -> None:
            for i in range(16):
                t.put("nodes", b"n%02d" % i, os.urandom(1 << 20))
        env.write(run)
        end = (int(env.env.info()["last_pgno"]) + 1) * PAGE
        assert end - before >= 16 << 20
        assert resident_fraction(tmp_path / "db" / "data.mdb", before, end) > 0.9
    finally:
        env.close()


def test_prewarm_reads_a_small_store_whole(tmp_path: Path) -> None:
    env = LmdbEnv(tmp_path / "db")
    try:
        append_chunks(env, LmdbStore(env, level=0), 16 << 20)
        data = tmp_path / "db" / "data.mdb"
        size = data.stat().st_size
        drop_pages(data)
        assert resident_fraction(data, 0, size) < 0.2
        assert env.prewarm()
        deadline = time.monotonic() + 20
        while resident_fraction(data, 0, size) < 0.95 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident_fraction(data, 0, size) >= 0.95
        assert not env.prewarm()                # not again so soon
        assert env.prewarms == 1
    finally:
        env.close()


def test_prewarm_reads_again_a_store_that_left_memory(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Within PREWARM_EVERY of a whole-store read, the store is read again only when most of
    it left the page cache meanwhile (drop_caches right after a mount read it, memory
    pressure): a walk then does not fault it in one page at a time."""
    monkeypatch.setattr(lmdb_mod, "PREWARM_LOOK", 0.0)
    env = LmdbEnv(tmp_path / "db")
    try:
        append_chunks(env, LmdbStore(env, level=0), 16 << 20)
        data = tmp_path / "db" / "data.mdb"
        size = data.stat().st_size

        def resident_soon() -> float:
            deadline = time.monotonic() + 20
            while resident_fraction(data, 0, size) < 0.95 and time.monotonic() < deadline:
                time.sleep(0.05)
            return resident_fraction(data, 0, size)
        drop_pages(data)
        assert env.prewarm() and resident_soon() >= 0.95
        assert not env.prewarm()                # still in memory: not again
        drop_pages(data)
        assert resident_fraction(data, 0, size) < 0.2
        assert env.prewarm() and resident_soon() >= 0.95
        assert env.prewarms == 2
    finally:
        env.close()


def test_prewarm_leaves_a_store_large_against_memory_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = LmdbEnv(tmp_path / "db")
    try:
        append_chunks(env, LmdbStore(env, level=0), 4 << 20)
        data = tmp_path / "db" / "data.mdb"
        size = data.stat().st_size
        monkeypatch.setattr(lmdb_mod, "memory_bytes", lambda: size * lmdb_mod.PREWARM_SHARE - 1)
        drop_pages(data)
        assert not env.prewarm()
        time.sleep(0.3)
        assert resident_fraction(data, 0, size) < 0.2
        assert env.prewarms == 0
    finally:
        env.close()


def test_prewarm_is_advice_and_never_an_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of descriptors (EMFILE), the whole-store read is skipped: neither a walk's read
    nor a mount fails for it."""
    env = LmdbEnv(tmp_path / "db")
    try:
        def no_fd(fd: int) -> int:
            raise OSError(errno.EMFILE, "Too many open files")
        monkeypatch.setattr(lmdb_mod.os, "dup", no_fd)
        assert not env.prewarm()
        assert env.prewarms == 0
    finally:
        env.close()


def test_a_readahead_window_is_read_whole_even_past_the_kernels_limit(tmp_path: Path) -> None:
    """The kernel reads at most max(read_ahead_kb, max_sectors_kb) of one WILLNEED (8 MiB on
    this machine's disk): a 32 MiB window over a map read at random must still arrive whole."""
    path = tmp_path / "data"
    size = 40 << 20
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    drop_pages(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    try:
        m.madvise(mmap.MADV_RANDOM)
        view = memoryview(m)
        try:
            ra = Readahead(32 << 20)
            ra.after(view[:PAGE])
        finally:
            view.release()
        deadline = time.monotonic() + 20
        while resident_fraction(path, PAGE, 32 << 20) < 0.95 and time.monotonic() < deadline:
            time.sleep(0.05)
        frac = resident_fraction(path, PAGE, 32 << 20)
        assert frac >= 0.95, f"only {frac:.0%} of the window was read"
        assert resident_fraction(path, (34 << 20), size) < 0.5      # and not far beyond it
    finally:
        m.close()
