"""The BlobStore contract: one suite run against every implementation (STYLE 3.6).

To add an implementation (the RemoteStore over gRPC, say), add one factory to STORE_FACTORIES:
a context manager taking (directory, compression level) and yielding a BlobStore that the
suite may fill and that is closed on exit. Every test below, and the model-based state
machine, then runs against it.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import zstandard
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from castore import codec
from castore.errors import ChunkNotFoundError, IntegrityError
from castore.ids import ChunkId
from castore.store import BlobStore, StoredChunk
from castore.store.lmdb import LmdbEnv, LmdbStore
from castore.store.memory import MemoryStore

StoreFactory = Callable[[Path, int], AbstractContextManager[BlobStore]]


@contextlib.contextmanager
def _memory_store(path: Path, level: int) -> Iterator[BlobStore]:
    yield MemoryStore(level=level)


@contextlib.contextmanager
def _lmdb_store(path: Path, level: int) -> Iterator[BlobStore]:
    env = LmdbEnv(path / "store")
    try:
        yield LmdbStore(env, level=level)
    finally:
        env.close()


STORE_FACTORIES: dict[str, StoreFactory] = {
    "memory": _memory_store,
    "lmdb": _lmdb_store,
    # "remote": an LmdbStore behind a port-0 server, reached through RemoteStore
}

COMPRESSIBLE = b"castore chunk " * 8000                      # ~110 KiB, zstd shrinks it a lot
INCOMPRESSIBLE = random.Random(7).randbytes(100_000)       # zstd cannot save 1/64 of it


@pytest.fixture(params=sorted(STORE_FACTORIES))
def make_store(request: pytest.FixtureRequest, tmp_path: Path
               ) -> Iterator[Callable[..., BlobStore]]:
    """Opens stores of the implementation under test, each in its own directory; all are
    closed at teardown."""
    factory = STORE_FACTORIES[request.param]
    with contextlib.ExitStack() as stack:
        count = 0

        def open_store(level: int = codec.DEFAULT_LEVEL) -> BlobStore:
            nonlocal count
            count += 1
            return stack.enter_context(factory(tmp_path / f"store{count}", level))
        yield open_store


@pytest.fixture
def store(make_store: Callable[..., BlobStore]) -> BlobStore:
    return make_store()


def _chunk(text: str) -> tuple[ChunkId, bytes]:
    data = text.encode()
    return ChunkId.of(data), data


def test_put_is_idempotent_and_get_round_trips(store: BlobStore) -> None:
    cid, data = _chunk("hello chunk")
    assert not store.has(cid)
    assert store.put(cid, data) is True
    assert store.put(cid, data) is False
    assert store.has(cid)
    assert store.get(cid) == data
    assert list(store.ids()) == [cid]


@pytest.mark.parametrize("data", [b"", b"x", COMPRESSIBLE, INCOMPRESSIBLE],
                         ids=["empty", "one-byte", "compressible", "incompressible"])
def test_get_returns_exactly_what_was_put(store: BlobStore, data: bytes) -> None:
    cid = ChunkId.of(data)
    assert store.put(cid, memoryview(data)) is True
    got = store.get(cid)
    assert isinstance(got, bytes)
    assert got == data


def test_put_with_wrong_id_raises_and_stores_nothing(store: BlobStore) -> None:
    cid, _ = _chunk("the real bytes")
    with pytest.raises(IntegrityError):
        store.put(cid, b"other bytes")
    assert not store.has(cid)
    assert list(store.ids()) == []
    with pytest.raises(ChunkNotFoundError):
        store.get(cid)


def test_wrong_bytes_do_not_replace_a_stored_chunk(store: BlobStore) -> None:
    cid, data = _chunk("kept")
    store.put(cid, data)
    with pytest.raises(IntegrityError):
        store.put(cid, b"not kept")
    assert store.get(cid) == data


def test_get_of_missing_raises_not_found(store: BlobStore) -> None:
    cid, _ = _chunk("never stored")
    with pytest.raises(ChunkNotFoundError):
        store.get(cid)
    with pytest.raises(ChunkNotFoundError):
        store.get_stored(cid)
    assert store.has(cid) is False


def test_delete(store: BlobStore) -> None:
    keep, keep_data = _chunk("keep")
    gone, gone_data = _chunk("gone")
    store.put(keep, keep_data)
    store.put(gone, gone_data)
    store.delete(gone)
    assert not store.has(gone)
    with pytest.raises(ChunkNotFoundError):
        store.get(gone)
    store.delete(gone)                           # deleting a missing chunk is fine
    store.delete(_chunk("never stored")[0])
    assert list(store.ids()) == [keep]
    assert store.put(gone, gone_data) is True    # and it can be stored again


def test_ids_sorted_and_resumable(store: BlobStore) -> None:
    # more than one page of LmdbStore.ids (1000 keys) so the paging is crossed
    cids = []
    for i in range(1500):
        cid, data = _chunk(f"chunk {i}")
        store.put(cid, data)
        cids.append(cid)
    expected = sorted(cids)
    assert list(store.ids()) == expected
    rng = random.Random(1)
    for after in [expected[0], expected[998], expected[999], expected[1000], expected[-1],
                  *rng.sample(expected, 5)]:
        assert list(store.ids(after=after)) == [c for c in expected if c > after]
    absent = _chunk("not stored")[0]             # resuming after an id the store lacks
    assert list(store.ids(after=absent)) == [c for c in expected if c > absent]
    assert list(store.ids(after=ChunkId(b"\xff" * 32))) == []


def test_ids_resume_after_a_deleted_id(store: BlobStore) -> None:
    cids = sorted(_chunk(f"c{i}")[0] for i in range(10))
    for i in range(10):
        store.put(*_chunk(f"c{i}"))
    store.delete(cids[4])
    assert list(store.ids(after=cids[4])) == cids[5:]


def test_stored_round_trip_compressed(make_store: Callable[..., BlobStore]) -> None:
    src, dst = make_store(), make_store()
    cid = ChunkId.of(COMPRESSIBLE)
    src.put(cid, COMPRESSIBLE)
    stored = src.get_stored(cid)
    assert stored.codec == codec.ZSTD
    assert stored.raw_len == len(COMPRESSIBLE)
    assert len(stored.data) < len(COMPRESSIBLE) // 10
    assert zstandard.ZstdDecompressor().decompress(stored.data) == COMPRESSIBLE
    assert dst.put_stored(cid, stored) is True
    assert dst.put_stored(cid, stored) is False
    assert dst.get(cid) == COMPRESSIBLE
    assert dst.get_stored(cid) == stored


def test_stored_round_trip_incompressible(make_store: Callable[..., BlobStore]) -> None:
    src, dst = make_store(), make_store()
    cid = ChunkId.of(INCOMPRESSIBLE)
    src.put(cid, INCOMPRESSIBLE)
    stored = src.get_stored(cid)
    assert stored == StoredChunk(codec.RAW, len(INCOMPRESSIBLE), INCOMPRESSIBLE)
    assert dst.put_stored(cid, stored) is True
    assert dst.get(cid) == INCOMPRESSIBLE


def test_put_stored_with_mismatched_bytes_raises(store: BlobStore) -> None:
    cid = ChunkId.of(COMPRESSIBLE)
    other = b"other text " * 8000
    bad = [
        StoredChunk(codec.RAW, len(other), other),                            # wrong raw bytes
        StoredChunk(codec.ZSTD, len(other),
                    zstandard.ZstdCompressor().compress(other)),               # wrong content
        StoredChunk(codec.ZSTD, len(COMPRESSIBLE), b"\x28\xb5\x2f\xfd garbage"),  # undecodable
        StoredChunk(codec.RAW, len(COMPRESSIBLE), COMPRESSIBLE[:-1]),         # truncated
        StoredChunk(99, len(COMPRESSIBLE), COMPRESSIBLE),                     # unknown codec
    ]
    for chunk in bad:
        with pytest.raises(IntegrityError):
            store.put_stored(cid, chunk)
    assert not store.has(cid)
    assert list(store.ids()) == []


def test_compression_level_zero_stores_raw(make_store: Callable[..., BlobStore]) -> None:
    store = make_store(level=0)
    cid = ChunkId.of(COMPRESSIBLE)
    store.put(cid, COMPRESSIBLE)
    assert store.get_stored(cid) == StoredChunk(codec.RAW, len(COMPRESSIBLE), COMPRESSIBLE)
    assert store.get(cid) == COMPRESSIBLE


# -- the store against a dict model, for every implementation -------------------------------

_payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda word, n: word * n, st.sampled_from([b"ab", b"castore ", b"\x00"]),
              st.integers(64, 4000)),                                # compressible
)


class StoreModel(RuleBasedStateMachine):
    """Random puts, gets, deletes and listings, checked against a dict."""

    factory: StoreFactory

    def __init__(self) -> None:
        super().__init__()
        self._dir = Path(tempfile.mkdtemp(prefix="castore-model-"))
        self._stack = contextlib.ExitStack()
        self.store = self._stack.enter_context(self.factory(self._dir, codec.DEFAULT_LEVEL))
        self.model: dict[ChunkId, bytes] = {}

    def teardown(self) -> None:
        self._stack.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    known = Bundle("known")

    @rule(target=known, data=_payloads)
    def put(self, data: bytes) -> ChunkId:
        cid = ChunkId.of(data)
        assert self.store.put(cid, data) is (cid not in self.model)
        self.model[cid] = data
        return cid

    @rule(cid=known)
    def put_again(self, cid: ChunkId) -> None:
        if cid in self.model:
            assert self.store.put(cid, self.model[cid]) is False

    @rule(cid=known, data=_payloads)
    def put_wrong_bytes(self, cid: ChunkId, data: bytes) -> None:
        if ChunkId.of(data) == cid:
            return
        with pytest.raises(IntegrityError):
            self.store.put(cid, data)

    @rule(cid=known)
    def get(self, cid: ChunkId) -> None:
        if cid in self.model:
            assert self.store.get(cid) == self.model[cid]
        else:
            with pytest.raises(ChunkNotFoundError):
                self.store.get(cid)

    @rule(cid=known)
    def copy_stored(self, cid: ChunkId) -> None:
        """get_stored then put_stored of the same chunk: verified, and not new."""
        if cid in self.model:
            stored = self.store.get_stored(cid)
            assert stored.raw_len == len(self.model[cid])
            assert self.store.put_stored(cid, stored) is False

    @rule(cid=consumes(known))
    def delete(self, cid: ChunkId) -> None:
        self.store.delete(cid)
        self.model.pop(cid, None)
        assert not self.store.has(cid)

    @rule(cid=known)
    def ids_after(self, cid: ChunkId) -> None:
        assert list(self.store.ids(after=cid)) == sorted(c for c in self.model if c > cid)

    @invariant()
    def same_ids(self) -> None:
        assert list(self.store.ids()) == sorted(self.model)
        for cid in self.model:
            assert self.store.has(cid)


def _machine_for(name: str) -> type[RuleBasedStateMachine]:
    machine = type(f"StoreModel_{name}", (StoreModel,),
                   {"factory": staticmethod(STORE_FACTORIES[name])})
    machine.TestCase.settings = settings(settings(), stateful_step_count=30)
    return machine


for _name in sorted(STORE_FACTORIES):
    globals()[f"TestStoreModel_{_name}"] = _machine_for(_name).TestCase
del _name
