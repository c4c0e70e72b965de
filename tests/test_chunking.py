"""Content-defined chunking: round trip, size bounds, streaming equals whole, edit locality."""
from __future__ import annotations

import functools
import random
from pathlib import Path

from hypothesis import given, note, settings
from hypothesis import strategies as st

from castore import chunking
from castore.chunking import MAX_SIZE, MIN_SIZE, StreamChunker, cut, split
from castore.ids import ChunkId

MiB = 1 << 20


def test_compiled_chunker_is_in_use() -> None:
    assert chunking.COMPILED is True
    assert chunking.chunker_name() == "fastcdc-cython"


def test_cut_points_are_pinned() -> None:
    """Chunk ids depend on the exact cut points: a fastcdc upgrade that moves them would make
    every new copy of old data store fresh chunks. These offsets are fastcdc 1.7.0's."""
    data = random.Random(1).randbytes(8 * MiB)
    assert [o for o, _ in cut(data)] == [0, 1267775, 2405168, 3447719, 4226286, 4800977,
                                        5775478, 6491529, 7377227, 8155797]
    assert [n for _, n in cut(bytes(10 * MiB))] == [MAX_SIZE, MAX_SIZE, 2 * MiB]


def test_tiny_inputs() -> None:
    assert list(cut(b"")) == []
    assert list(split(b"")) == []
    assert list(cut(b"x")) == [(0, 1)]
    assert list(cut(bytes(MIN_SIZE))) == [(0, MIN_SIZE)]
    assert StreamChunker().finish() == []


# Inputs are built from a few segments (random, zero-filled, a short repeated pattern), so
# chunks end both at content-defined cuts and at MAX_SIZE; the bytes come from a seeded
# generator, since hypothesis cannot draw megabytes efficiently.
_segment = st.tuples(st.sampled_from(["random", "zeros", "pattern"]),
                     st.one_of(st.integers(0, 2 * MIN_SIZE), st.integers(2 * MiB, 6 * MiB)))


@st.composite
def inputs(draw: st.DrawFn, min_segments: int = 1, max_segments: int = 3) -> bytes:
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    segments = draw(st.lists(_segment, min_size=min_segments, max_size=max_segments))
    rng = random.Random(seed)
    parts = []
    for kind, n in segments:
        if kind == "random":
            parts.append(rng.randbytes(n))
        elif kind == "zeros":
            parts.append(bytes(n))
        else:
            parts.append((rng.randbytes(rng.randint(1, 300)) * (n // 2 + 1))[:n])
    return b"".join(parts)


def _check_bounds(lengths: list[int], total: int) -> None:
    assert sum(lengths) == total
    assert all(n > 0 for n in lengths)
    for n in lengths[:-1]:
        assert MIN_SIZE <= n <= MAX_SIZE
    if lengths:
        assert lengths[-1] <= MAX_SIZE


@given(data=inputs())
def test_chunks_join_to_input_within_bounds(data: bytes) -> None:
    spans = list(cut(data))
    offset = 0
    for off, n in spans:               # contiguous, in order, from 0
        assert off == offset
        offset += n
    assert offset == len(data)
    chunks = [bytes(c) for c in split(data)]
    assert b"".join(chunks) == data
    _check_bounds([len(c) for c in chunks], len(data))


@st.composite
def fed_in_pieces(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    """An input and the offsets where it is split into pieces for feeding (a dozen at most,
    so tiny pieces appear without millions of feed calls)."""
    data = draw(inputs(min_segments=2, max_segments=4))
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    return data, sorted(set(cuts) | {len(data)})


@given(fed=fed_in_pieces(), window=st.sampled_from([None, MAX_SIZE + 1, 3 * MAX_SIZE]))
def test_stream_chunker_equals_whole_input(fed: tuple[bytes, list[int]],
                                           window: int | None) -> None:
    data, ends = fed
    expected = [bytes(c) for c in split(data)]
    chunker = StreamChunker() if window is None else StreamChunker(window)
    got: list[bytes] = []
    pos = 0
    for end in ends:
        got += chunker.feed(memoryview(data)[pos:end])
        pos = end
        assert sum(map(len, got)) <= pos
        assert len(chunker._buf) <= max(window or 2 * MAX_SIZE, MAX_SIZE + 1)   # bounded
    got += chunker.finish()
    assert [len(c) for c in got] == [len(c) for c in expected]
    assert got == expected


def test_file_chunks_equal_split(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(9 * MiB) + bytes(5 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert list(chunking.read_file_chunks(path)) == [bytes(c) for c in split(data)]
    (tmp_path / "empty").write_bytes(b"")
    assert list(chunking.read_file_chunks(tmp_path / "empty")) == []


@functools.cache
def _base() -> tuple[bytes, tuple[ChunkId, ...]]:
    data = random.Random(24).randbytes(24 * MiB)
    return data, tuple(ChunkId.of(c) for c in split(data))


@settings(max_examples=settings.default.max_examples * 3 // 5)    # 15 under "ci"
@given(pos=st.integers(4 * MiB, 20 * MiB),
       edit=st.sampled_from(["insert", "delete", "overwrite"]),
       payload=st.binary(min_size=1, max_size=64))
def test_small_edit_changes_few_chunks(pos: int, edit: str, payload: bytes) -> None:
    """A few bytes changed in the middle of 24 MiB change at most 3 chunk ids: the chunks
    before the edit are untouched and the cuts after it fall back into step."""
    base, before = _base()
    if edit == "insert":
        changed = base[:pos] + payload + base[pos:]
    elif edit == "delete":
        changed = base[:pos] + base[pos + len(payload):]
    else:
        flipped = bytes(b ^ 0x5A for b in base[pos:pos + len(payload)])
        changed = base[:pos] + flipped + base[pos + len(flipped):]
    spans = list(cut(changed))
    after = [ChunkId.of(memoryview(changed)[o:o + n]) for o, n in spans]
    added, dropped = set(after) - set(before), set(before) - set(after)
    note(f"{len(before)} chunks before, {len(after)} after; {len(added)} new, "
         f"{len(dropped)} gone")
    assert 1 <= len(added) <= 3
    assert 1 <= len(dropped) <= 3
    # the chunks that end before the edit are exactly the old ones
    kept = sum(1 for o, n in spans if o + n <= pos)
    assert after[:kept] == list(before[:kept])
    # the differing chunks are one run: a common prefix and a common suffix cover the rest
    prefix = next(i for i, (a, b) in enumerate(zip(after, before)) if a != b)
    suffix = next(i for i, (a, b) in enumerate(zip(reversed(after), reversed(before)))
                  if a != b)
    assert set(after[prefix:len(after) - suffix]) == added
    assert set(before[prefix:len(before) - suffix]) == dropped
