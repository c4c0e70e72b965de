"""Manifests, and whole files through the Repo facade on real LMDB: round trips, ranges,
stat, dedup, tree edits, stats, verify, on-disk corruption and map growth."""
from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from castore import chunking
from castore.config import Config
from castore.errors import (ExistsError, IntegrityError, IsDirectoryError, NotEmptyError,
                            PathNotFoundError, UsageError)
from castore.files import EMPTY, Manifest
from castore.ids import ChunkId
from castore.repo import IngestItem, Repo

MiB = 1 << 20


def _read(repo: Repo, target: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join(repo.read(target, offset, length))


def _ok(results: Iterator) -> list:  # type: ignore[type-arg]
    out = list(results)
    assert [r.error for r in out if r.error] == []
    return out


# -- manifests -------------------------------------------------------------------------------

def _manifest(lengths: list[int]) -> Manifest:
    return Manifest(tuple(ChunkId.of(i.to_bytes(4, "little")) for i in range(len(lengths))),
                    tuple(lengths))


def test_manifest_encoding_and_id() -> None:
    m = _manifest([5, 7, 11])
    buf = m.encode()
    assert Manifest.decode(buf) == m
    assert Manifest.decode(memoryview(buf)) == m
    assert m.id == ChunkId.of(buf)
    assert m.size == 23 and m.offsets == [0, 5, 12, 23]
    assert _manifest([5, 7, 12]).id != m.id
    assert EMPTY.size == 0 and Manifest.decode(EMPTY.encode()) == EMPTY
    with pytest.raises(ValueError):
        Manifest(m.chunks, (1, 2))


@pytest.mark.parametrize("mutate", [lambda b: b"XXXX" + b[4:], lambda b: b[:-1],
                                    lambda b: b + b"\x00", lambda b: b[:4] + b"\x09" + b[5:]],
                         ids=["magic", "truncated", "trailing", "count"])
def test_manifest_decode_refuses_garbage(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(IntegrityError):
        Manifest.decode(mutate(_manifest([1, 2, 3]).encode()))


@given(lengths=st.lists(st.integers(1, 8 * MiB), min_size=1, max_size=40), data=st.data())
def test_locate_bisects_to_the_chunk(lengths: list[int], data: st.DataObject) -> None:
    m = _manifest(lengths)
    for i, start in enumerate(m.offsets[:-1]):          # every boundary and its neighbours
        assert m.locate(start) == i
        assert m.locate(start + lengths[i] - 1) == i
        if i:
            assert m.locate(start - 1) == i - 1
    assert m.locate(m.size) == len(lengths)
    assert m.locate(m.size + 12345) == len(lengths)
    offset = data.draw(st.integers(0, m.size - 1), label="offset")
    i = m.locate(offset)
    assert m.offsets[i] <= offset < m.offsets[i + 1]


# -- a loaded repo, shared by the read-only tests --------------------------------------------

@dataclass
class Loaded:
    repo: Repo
    src: Path
    files: dict[str, bytes]            # repo path -> bytes
    big_cuts: list[int]                # chunk start offsets of /big.bin


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    base = tmp_path_factory.mktemp("loaded")
    rng = random.Random(20)
    src = base / "src"
    tree = src / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    contents = {
        "big.bin": rng.randbytes(20 * MiB),
        "tree/empty": b"",
        "tree/one": b"1",
        "tree/text.txt": b"hello castore\n" * 100,
        "tree/sub/just-over-min": rng.randbytes(chunking.MIN_SIZE + 1),
        "tree/sub/mmapped": rng.randbytes(5 * MiB),               # over SMALL_FILE
        "tree/sub/deeper/\xe9t\xe9": rng.randbytes(3000),          # a non-ASCII name
    }
    for rel, data in contents.items():
        (src / rel).write_bytes(data)
    os.chmod(src / "big.bin", 0o640)
    os.utime(src / "big.bin", ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789))
    os.symlink("text.txt", tree / "link")
    repo = Repo.init(Config.load(base / "home", env={}))
    try:
        results = _ok(repo.add_paths([str(src / "big.bin"), str(tree)], dest="/",
                                     recursive=True))
        big = next(r for r in results if r.path == "/big.bin")
        cuts = [o for o, _ in chunking.cut(contents["big.bin"])]
        assert big.new_chunks == len(cuts) and len(cuts) > 5
        files = {"/big.bin": contents["big.bin"]}
        files.update({"/" + k: v for k, v in contents.items() if k.startswith("tree/")})
        yield Loaded(repo, src, files, cuts)
    finally:
        repo.close()


def test_files_read_back_bit_identical(loaded: Loaded) -> None:
    for path, data in loaded.files.items():
        got = _read(loaded.repo, path)
        assert len(got) == len(data), path
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), path


def test_read_by_content_id(loaded: Loaded) -> None:
    for path in ("/big.bin", "/tree/text.txt"):
        content = loaded.repo.stat(path).content
        assert _read(loaded.repo, content) == loaded.files[path]


@st.composite
def _ranges(draw: st.DrawFn, cuts: list[int], size: int) -> tuple[int, int | None]:
    near_cut = st.builds(lambda c, d: max(0, c + d), st.sampled_from(cuts),
                         st.integers(-3, 3))
    offset = draw(st.one_of(near_cut, st.integers(0, size + 10)))
    length = draw(st.one_of(st.none(), st.integers(0, 5), st.integers(0, 9 * MiB),
                            near_cut.map(lambda end: max(0, end - offset))))
    return offset, length


def test_random_ranges_of_a_large_file(loaded: Loaded) -> None:
    data = loaded.files["/big.bin"]

    @given(rng=_ranges(loaded.big_cuts, len(data)))
    def check(rng: tuple[int, int | None]) -> None:
        offset, length = rng
        end = None if length is None else offset + length
        assert _read(loaded.repo, "/big.bin", offset, length) == data[offset:end]
    check()


def test_read_refuses_negative_ranges(loaded: Loaded) -> None:
    with pytest.raises(UsageError):
        loaded.repo.read("/big.bin", -1)
    with pytest.raises(UsageError):
        loaded.repo.read("/big.bin", 0, -1)
    with pytest.raises(IsDirectoryError):
        loaded.repo.read("/tree")
    with pytest.raises(PathNotFoundError):
        loaded.repo.read("/nope")


def test_stat_fields(loaded: Loaded) -> None:
    info = os.stat(loaded.src / "big.bin")
    e = loaded.repo.stat("/big.bin")
    assert (e.kind, e.name, e.path) == ("file", "big.bin", "/big.bin")
    assert e.size == 20 * MiB
    assert e.mode == 0o640
    assert e.mtime_ns == info.st_mtime_ns == 1_600_000_000_123_456_789
    assert e.chunks == len(loaded.big_cuts)
    assert e.versions == 1
    assert len(e.content) == 64
    assert loaded.repo.manifest_of("/big.bin").size == 20 * MiB
    small = loaded.repo.stat("/tree/text.txt")
    assert (small.size, small.chunks) == (1400, 1)
    assert small.content == ChunkId.of(loaded.files["/tree/text.txt"]).hex
    assert loaded.repo.stat("/tree/empty").size == 0
    link = loaded.repo.stat("/tree/link")
    assert (link.kind, link.target) == ("symlink", "text.txt")
    assert loaded.repo.stat("/tree").kind == "dir"


def test_listdir(loaded: Loaded) -> None:
    names = [(e.name, e.kind) for e in loaded.repo.listdir("/tree")]
    assert names == sorted(names)
    assert set(names) == {("empty", "file"), ("one", "file"), ("text.txt", "file"),
                          ("link", "symlink"), ("sub", "dir")}
    deeper = loaded.repo.listdir("/tree/sub/deeper")
    assert [e.name for e in deeper] == ["\xe9t\xe9"]
    assert [e.name for e in loaded.repo.listdir("/")] == ["big.bin", "tree"]


def test_verify_is_ok_on_a_clean_repo(loaded: Loaded) -> None:
    report = loaded.repo.verify()
    stats = loaded.repo.stats()
    assert report.ok, (report.corrupt, report.missing)
    assert report.chunks == stats["chunks"] > len(loaded.big_cuts)
    assert report.bytes == stats["raw_bytes"] == sum(map(len, loaded.files.values()))
    # one manifest per file of several chunks; a one-chunk file names its chunk directly
    assert report.manifests == sum(len(list(chunking.cut(d))) > 1
                                   for d in loaded.files.values()) == 2


# -- edits on a fresh repo -------------------------------------------------------------------

def test_second_add_of_the_same_file_dedups(repo: Repo, tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(random.Random(1).randbytes(6 * MiB))
    first = _ok(repo.add_paths([str(path)]))[0]
    chunks_before = repo.stats()["chunks"]
    second = _ok(repo.add_paths([str(path)]))[0]
    assert first.new_chunks > 1
    assert second.new_chunks == 0
    assert second.content == first.content
    assert repo.stats()["chunks"] == chunks_before
    e = repo.stat("/f.bin")
    assert e.versions == 1 and e.content == first.content
    assert _read(repo, "/f.bin") == path.read_bytes()


def test_mkdir_rename_remove(repo: Repo) -> None:
    repo.mkdir("/a")
    assert repo.mkdir("/a/b/c", parents=True).kind == "dir"
    with pytest.raises(ExistsError):
        repo.mkdir("/a")
    with pytest.raises(PathNotFoundError):
        repo.mkdir("/x/y")
    _ok(repo.ingest([IngestItem("/a/f.txt", data=b"first"),
                     IngestItem("/a/g.txt", data=b"second")]))
    moved = repo.rename("/a/f.txt", "/a/b/moved.txt")
    assert moved.path == "/a/b/moved.txt"
    assert _read(repo, "/a/b/moved.txt") == b"first"
    with pytest.raises(PathNotFoundError):
        repo.stat("/a/f.txt")
    repo.rename("/a/g.txt", "/a/b/moved.txt")           # over an existing file
    assert _read(repo, "/a/b/moved.txt") == b"second"
    assert [e.name for e in repo.listdir("/a/b")] == ["c", "moved.txt"]
    assert [e.name for e in repo.listdir("/a")] == ["b"]
    with pytest.raises(NotEmptyError):
        repo.remove("/a")
    repo.remove("/a/b/c")
    assert [e.name for e in repo.listdir("/a/b")] == ["moved.txt"]
    assert repo.remove("/a", recursive=True) == 3        # a, a/b, a/b/moved.txt
    assert repo.listdir("/") == []
    with pytest.raises(PathNotFoundError):
        repo.stat("/a/b/moved.txt")
    assert repo.stats()["files"] == 0


def test_two_copies_of_a_tree_dedup(repo: Repo, tmp_path: Path) -> None:
    rng = random.Random(2)
    tree = tmp_path / "photos"
    (tree / "2024").mkdir(parents=True)
    for i in range(6):
        (tree / "2024" / f"img{i}.raw").write_bytes(rng.randbytes(rng.randint(1, 600_000)))
    (tree / "big.raw").write_bytes(rng.randbytes(7 * MiB))
    _ok(repo.add_paths([str(tree)], dest="/one", recursive=True))
    once = repo.stats()
    second = _ok(repo.add_paths([str(tree)], dest="/two", recursive=True))
    twice = repo.stats()
    assert sum(r.new_chunks for r in second) == 0
    assert twice["chunks"] == once["chunks"]
    assert twice["raw_bytes"] == once["raw_bytes"]
    assert twice["files"] == 14
    assert twice["logical_bytes"] == 2 * once["logical_bytes"]
    assert twice["dedup_ratio"] > 1.9
    assert _read(repo, "/two/photos/big.raw") == (tree / "big.raw").read_bytes()
    assert repo.verify().ok


def test_a_tree_add_with_a_vanished_file_a_large_one_and_a_name_twice(
        repo: Repo, tmp_path: Path) -> None:
    """Committed results come in plan order with a large file stored between small ones, a
    file gone since the walk fails alone, and a name already placed in a directory made by
    the same commit is updated, not duplicated (no lookup is skipped for it)."""
    from castore.repo import plan_paths
    rng = random.Random(5)
    tree = tmp_path / "t"
    (tree / "a").mkdir(parents=True)
    bodies = {}
    for i in range(300):
        bodies[f"a/f{i:03d}"] = rng.randbytes(rng.randint(0, 9000))
    bodies["a/g-big"] = rng.randbytes(6 * MiB)
    for rel, body in bodies.items():
        (tree / rel).write_bytes(body)
    items, errors = plan_paths([str(tree)], "/", True)
    assert not errors
    again = [i for i in items if i.dest == "/t/a/f007"][0]
    items.append(IngestItem(again.dest, mode=0o644, source=again.source, size=again.size))
    (tree / "a" / "f100").unlink()
    results = list(repo.ingest(items))
    failed = [r.path for r in results if r.error]
    assert failed == ["/t/a/f100"]
    assert [r.path for r in results if not r.error] == \
        [i.dest for i in items if i.dest not in failed]
    for rel, body in bodies.items():
        if rel != "a/f100":
            assert _read(repo, f"/t/{rel}") == body
    names = [e.name for e in repo.listdir("/t/a")]
    assert len(names) == len(set(names)) == len(bodies) - 1
    assert repo.stat("/t/a/f007").versions == 1


# -- corruption on disk, and a map that must grow --------------------------------------------

def test_a_flipped_byte_on_disk_is_caught(tmp_path: Path) -> None:
    """LMDB keeps no checksums: a byte flipped in data.mdb must be caught by the BLAKE3 check
    on read and by verify, naming the chunk."""
    config = Config.load(tmp_path / "home", env={}, compression_level=0)
    data = random.Random(3).randbytes(3 * MiB)
    src = tmp_path / "victim.bin"
    src.write_bytes(data)
    spans = list(chunking.cut(data))
    assert len(spans) >= 2
    off, n = spans[1]
    victim = ChunkId.of(data[off:off + n])
    marker = data[off + n // 2:off + n // 2 + 64]
    with Repo.init(config) as repo:
        _ok(repo.add_paths([str(src)]))
        assert repo.verify().ok
    db = config.store_path / "data.mdb"
    raw = bytearray(db.read_bytes())
    assert raw.count(marker) == 1              # stored raw, exactly once
    at = raw.index(marker) + 10
    with open(db, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[at] ^ 0x01]))
    with Repo.open(config) as repo:
        with pytest.raises(IntegrityError) as caught:
            _read(repo, "/victim.bin")
        assert victim.hex in str(caught.value)
        # the chunks before the flipped one still read fine
        assert _read(repo, "/victim.bin", 0, spans[0][1]) == data[:spans[0][1]]
        report = repo.verify()
        assert not report.ok
        assert report.corrupt == [victim.hex]
        assert report.missing == []


def test_a_small_map_grows(tmp_path: Path) -> None:
    config = Config.load(tmp_path / "home", env={}, map_size=1 << 20)
    data = random.Random(4).randbytes(30 * MiB)
    src = tmp_path / "thirty.bin"
    src.write_bytes(data)
    with Repo.init(config) as repo:
        assert repo.env.map_size() == 1 << 20
        result = _ok(repo.add_paths([str(src)]))[0]
        assert result.size == 30 * MiB
        assert repo.env.map_size() >= 30 * MiB
        assert _read(repo, "/thirty.bin") == data
    with Repo.open(config) as repo:            # reopened with the small configured map
        assert repo.stats()["raw_bytes"] == 30 * MiB
        assert _read(repo, "/thirty.bin", 17 * MiB, 1000) == data[17 * MiB:17 * MiB + 1000]
        _ok(repo.ingest([IngestItem("/more.bin", data=data[:3 * MiB] + b"x")]))
        assert repo.verify().ok
