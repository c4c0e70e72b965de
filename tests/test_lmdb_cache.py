"""The store's use of the page cache. Drop-behind of bulk commits: the pages a large commit of
chunk bytes appends to data.mdb leave the page cache once they are durable; small commits,
namespace commits and chunks handed to replication keep theirs. Residency is read with
mincore(2). Read-around: a store small against memory lets the kernel read neighbouring pages
with each fault (counted as major faults in a reader process)."""
from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from castore.ids import ChunkId
from castore.store import lmdb as lmdb_mod
from castore.store.lmdb import LmdbEnv, LmdbStore, LmdbTxn, read_around
from castore.store.readahead import WINDOW, WINDOW_AROUND, Readahead
from pagecache import PAGE, resident_fraction


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


def test_read_around_follows_the_store_size_against_memory(tmp_path: Path) -> None:
    data = tmp_path / "data.mdb"
    assert read_around(data, memory=1 << 30)                 # a new store
    data.write_bytes(b"x" * (1 << 20))
    assert read_around(data, memory=4 << 20)                 # exactly a quarter
    assert not read_around(data, memory=(4 << 20) - 1)
    assert not read_around(data, memory=0)                   # memory unknown: no guess


@pytest.mark.parametrize("around", [True, False])
def test_the_map_mode_and_the_readahead_window_match(tmp_path: Path, around: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not around:
        monkeypatch.setattr(lmdb_mod, "memory_bytes", lambda: 0)
    env = LmdbEnv(tmp_path / "db")
    try:
        assert env.read_around is around
        assert env.env.flags()["readahead"] is around
        assert env.readahead_for(1 << 40).window == (WINDOW_AROUND if around else WINDOW)
        assert env.readahead_for(5000).window == 5000
    finally:
        env.close()


def random_read_flags(data: Path) -> list[bool]:
    """For each mapping of data in this process: whether the kernel reads it at random
    (VM_RAND_READ, 'rr' among VmFlags in /proc/self/smaps)."""
    target, out, current = str(data.resolve()), [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 5)
            if first and "-" in first[0] and len(first) >= 5:      # a mapping's header
                current = len(first) == 6 and first[5].rstrip("\n") == target
            elif current and line.startswith("VmFlags:"):
                out.append("rr" in line.split()[1:])
    return out


@pytest.mark.parametrize("around", [True, False])
def test_the_kernel_is_told_how_the_map_is_read(tmp_path: Path, around: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if not around:
        monkeypatch.setattr(lmdb_mod, "memory_bytes", lambda: 0)
    env = LmdbEnv(tmp_path / "db")
    try:
        flags = random_read_flags(tmp_path / "db" / "data.mdb")
        assert flags and all(f is not around for f in flags), flags
    finally:
        env.close()


def test_a_store_that_outgrows_read_around_stops_using_it(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    env = LmdbEnv(tmp_path / "db", map_size=1 << 20)
    try:
        store = LmdbStore(env, level=0)
        data = os.urandom(64 << 10)
        store.put(ChunkId.of(data), data)
        assert env.read_around
        monkeypatch.setattr(lmdb_mod, "memory_bytes", lambda: 1 << 20)  # now too large
        for _ in range(40):                     # grows the map (1 MiB at first)
            data = os.urandom(64 << 10)
            store.put(ChunkId.of(data), data)
        assert env.map_size() > 1 << 20
        assert not env.read_around
        flags = random_read_flags(tmp_path / "db" / "data.mdb")
        assert flags and all(flags), flags
        assert env.readahead_for(1 << 40).window == WINDOW
        assert len(store.get(ChunkId.of(data))) == 64 << 10
    finally:
        env.close()


_READER = """
import random, resource, sys
from castore.store import lmdb as m
if sys.argv[2] == "off":
    m.memory_bytes = lambda: 0
env = m.LmdbEnv(sys.argv[1], readonly=True)
store = m.LmdbStore(env)
ids = list(store.ids())
random.Random(7).shuffle(ids)
before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
assert all(store.get(cid) for cid in ids)
print(env.read_around, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before)
"""


def test_a_cold_walk_of_small_chunks_faults_far_less_with_read_around(tmp_path: Path) -> None:
    """2,000 chunks of 1-3 KiB (most of them inside B-tree leaves, spread by their hash), read
    in random order by a fresh process once their pages left the cache: without read-around
    about one major fault per leaf; with it, the kernel brings the neighbours of each."""
    env = LmdbEnv(tmp_path / "db")
    try:
        rnd = random.Random(3)
        items = []
        for _ in range(2000):
            data = rnd.randbytes(rnd.randint(1024, 3072))
            items.append((ChunkId.of(data), data))
        LmdbStore(env, level=0).put_many(items)
    finally:
        env.close()
    faults = {}
    for mode in ("off", "on"):
        fd = os.open(tmp_path / "db" / "data.mdb", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        out = subprocess.run([sys.executable, "-c", _READER, str(tmp_path / "db"), mode],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        shown, count = out.split()
        assert shown == ("True" if mode == "on" else "False")
        faults[mode] = int(count)
    assert faults["off"] >= 200, faults         # the pages really came from the disk
    assert faults["on"] * 4 <= faults["off"], faults


def test_a_readahead_window_is_read_whole_even_past_the_kernels_limit(tmp_path: Path) -> None:
    """The kernel reads at most max(read_ahead_kb, max_sectors_kb) of one WILLNEED (8 MiB on
    this machine's disk): a 32 MiB window over a map read at random must still arrive whole."""
    path = tmp_path / "data"
    size = 40 << 20
    with open(path, "wb") as f:
        f.write(os.urandom(size))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
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
