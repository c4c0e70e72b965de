"""Drop-behind of bulk commits: the pages a large commit of chunk bytes appends to data.mdb
leave the page cache once they are durable; small commits, namespace commits and chunks handed
to replication keep theirs. Residency is read with mincore(2)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from castore.ids import ChunkId
from castore.store.lmdb import LmdbEnv, LmdbStore, LmdbTxn
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
