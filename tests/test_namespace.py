"""The namespace engine: tree edits and their refusals, name rules, record encodings, version
vectors, and convergence of replicas that apply the same ops in any order.

Runs over MemoryKv (and a few cases over a real LmdbEnv) through the KvTxn seam; nothing is
mocked except the source of random node ids, which the convergence property seeds so that a
printed seed replays the same run.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

from castore.errors import (CastoreError, ExistsError, InvalidNameError, IsDirectoryError,
                            NameTooLongError, NotDirectoryError, NotEmptyError,
                            PathNotFoundError)
from castore.hlc import HybridClock
from castore.ids import ROOT, TRASH, NodeId
from castore.namespace import Namespace
from castore.ops import Kind, Node, Op, OpType, Version, check_name, int_attr, split_path
from castore.store import KvTxn
from castore.store.lmdb import LmdbEnv
from castore.store.memory import MemoryKv

A, B = b"A" * 16, b"B" * 16
REF = b"C" + b"r" * 32                      # a content ref (one-chunk form)


def _ref(tag: bytes) -> bytes:
    return b"C" + (tag * 32)[:32]


@pytest.fixture(params=["memory", "lmdb"])
def kv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A KvTxn source: MemoryKv, or a real LmdbEnv under tmp_path."""
    if request.param == "memory":
        yield MemoryKv()
    else:
        env = LmdbEnv(tmp_path / "ns")
        try:
            yield env
        finally:
            env.close()


class Tree:
    """One replica's namespace over one kv, with path helpers for the tests."""

    def __init__(self, kv: Any, replica: bytes = A) -> None:
        self.kv = kv
        self.ns = Namespace(replica)

    def __call__(self, fn: Callable[[Namespace, KvTxn], Any]) -> Any:
        return self.kv.write(lambda t: fn(self.ns, t))

    def mkdir(self, path: str) -> NodeId:
        def run(ns: Namespace, t: KvTxn) -> NodeId:
            parent, name = ns.resolve_parent(t, path)
            return ns.create(t, parent, name, Kind.DIR).id
        return self(run)

    def mkfile(self, path: str, ref: bytes = REF, size: int = 1) -> NodeId:
        def run(ns: Namespace, t: KvTxn) -> NodeId:
            parent, name = ns.resolve_parent(t, path)
            return ns.create(t, parent, name, Kind.FILE, {}, ref, size).id
        return self(run)

    def node(self, path: str) -> Node:
        return self(lambda ns, t: ns.resolve(t, path))

    def get(self, nid: NodeId) -> Node | None:
        return self(lambda ns, t: ns.get(t, nid))

    def names(self, path: str = "/") -> list[bytes]:
        return self(lambda ns, t: [n for n, _, _ in ns.children(t, ns.resolve(t, path).id)])

    def rename(self, src: str, dst: str) -> None:
        def run(ns: Namespace, t: KvTxn) -> None:
            parent, name = ns.resolve_parent(t, dst)
            ns.rename(t, ns.resolve(t, src), parent, name)
        self(run)

    def remove(self, path: str) -> None:
        self(lambda ns, t: ns.remove(t, ns.resolve(t, path)))


# -- tree edits ------------------------------------------------------------------------------

def test_create_lookup_resolve_children(kv: Any) -> None:
    tree = Tree(kv)
    docs = tree.mkdir("/docs")
    f = tree.mkfile("/docs/a.txt", REF, 10)
    tree.mkfile("/docs/B.txt")
    tree.mkdir("/docs/sub")
    assert tree(lambda ns, t: ns.lookup(t, ROOT, b"docs")) == docs
    assert tree(lambda ns, t: ns.lookup(t, docs, b"a.txt")) == f
    assert tree(lambda ns, t: ns.lookup(t, docs, b"nope")) is None
    for path in ("/docs/a.txt", "docs/a.txt", "/docs//a.txt", "/docs/./a.txt"):
        assert tree.node(path).id == f
    node = tree.node("/docs/a.txt")
    assert (node.kind, node.parent, node.name) == (Kind.FILE, docs, b"a.txt")
    assert node.head == Version(node.move_key, REF, 10)
    assert tree.node("/").id == ROOT
    # sorted by name bytes, with kinds; TRASH is never listed
    assert tree(lambda ns, t: list(ns.children(t, docs))) == [
        (b"B.txt", tree.node("/docs/B.txt").id, Kind.FILE), (b"a.txt", f, Kind.FILE),
        (b"sub", tree.node("/docs/sub").id, Kind.DIR)]
    assert tree.names("/") == [b"docs"]
    assert tree(lambda ns, t: ns.in_tree(t, node)) is True


def test_create_and_resolve_refusals(kv: Any) -> None:
    tree = Tree(kv)
    tree.mkdir("/d")
    tree.mkfile("/d/f")
    with pytest.raises(ExistsError):
        tree.mkfile("/d/f")
    with pytest.raises(ExistsError):
        tree.mkdir("/d")
    with pytest.raises(NotDirectoryError):
        tree.mkfile("/d/f/g")
    with pytest.raises(NotDirectoryError):
        tree.node("/d/f/g")
    with pytest.raises(PathNotFoundError):
        tree.node("/d/missing")
    with pytest.raises(PathNotFoundError):
        tree.mkfile("/nowhere/f")
    with pytest.raises(IsDirectoryError):
        tree(lambda ns, t: ns.set_content(t, ns.resolve(t, "/d"), REF, 1))
    assert tree.names("/d") == [b"f"]


def test_set_content_replaces_the_head(kv: Any) -> None:
    tree = Tree(kv)
    tree.mkfile("/f", _ref(b"1"), 1)
    key = tree(lambda ns, t: ns.set_content(t, ns.resolve(t, "/f"), _ref(b"2"), 2))
    node = tree.node("/f")
    assert node.heads == [Version(key, _ref(b"2"), 2)]


def test_rename_over_an_existing_file_replaces_it(kv: Any) -> None:
    tree = Tree(kv)
    a = tree.mkfile("/a", _ref(b"a"))
    b = tree.mkfile("/b", _ref(b"b"))
    tree.rename("/a", "/b")
    assert tree.names() == [b"b"]
    assert tree.node("/b").id == a
    assert tree.node("/b").head.manifest == _ref(b"a")  # type: ignore[union-attr]
    old = tree.get(b)
    assert old is not None and old.parent == TRASH
    assert tree(lambda ns, t: ns.in_tree(t, old)) is False


def test_rename_moves_between_directories(kv: Any) -> None:
    tree = Tree(kv)
    tree.mkdir("/x")
    tree.mkdir("/y")
    f = tree.mkfile("/x/f")
    tree.rename("/x/f", "/y/g")
    assert tree.names("/x") == []
    assert tree.names("/y") == [b"g"]
    assert tree.node("/y/g").id == f
    tree.rename("/y/g", "/y/g")                     # onto itself: nothing changes
    assert tree.node("/y/g").id == f


def test_rename_of_a_dir_over_an_empty_dir(kv: Any) -> None:
    tree = Tree(kv)
    src = tree.mkdir("/src")
    tree.mkfile("/src/inner")
    empty = tree.mkdir("/empty")
    tree.rename("/src", "/empty")
    assert tree.names() == [b"empty"]
    assert tree.node("/empty").id == src
    assert tree.names("/empty") == [b"inner"]
    assert tree.get(empty).parent == TRASH  # type: ignore[union-attr]


def test_rename_refusals(kv: Any) -> None:
    tree = Tree(kv)
    tree.mkdir("/full")
    tree.mkfile("/full/x")
    tree.mkdir("/other")
    tree.mkfile("/file")
    before = tree(lambda ns, t: sorted((k, bytes(v)) for k, v in t.scan("dirents")))
    with pytest.raises(NotEmptyError):
        tree.rename("/other", "/full")
    with pytest.raises(IsDirectoryError):
        tree.rename("/file", "/other")
    with pytest.raises(NotDirectoryError):
        tree.rename("/other", "/file")
    with pytest.raises(NotDirectoryError):
        tree.rename("/other", "/file/x")
    with pytest.raises(InvalidNameError):
        tree(lambda ns, t: ns.rename(t, ns.get(t, ROOT), ns.resolve(t, "/other"), b"r"))
    assert tree(lambda ns, t: sorted((k, bytes(v)) for k, v in t.scan("dirents"))) == before


def test_moving_a_dir_into_its_own_subtree_is_refused(kv: Any) -> None:
    tree = Tree(kv)
    tree.mkdir("/a")
    tree.mkdir("/a/b")
    tree.mkdir("/a/b/c")
    for dst in ("/a/b/c/a", "/a/b/x", "/a/inside"):
        with pytest.raises(InvalidNameError):
            tree.rename("/a", dst)
    assert tree.names() == [b"a"]
    assert tree.node("/a/b/c").kind == Kind.DIR
    assert tree(lambda ns, t: ns.vv(t)) == {A: 3}       # no op was recorded for the refusals


def test_remove_moves_to_trash(kv: Any) -> None:
    tree = Tree(kv)
    tree.mkdir("/d")
    f = tree.mkfile("/d/f")
    with pytest.raises(NotEmptyError):
        tree.remove("/d")
    tree.remove("/d/f")
    node = tree.get(f)
    assert node is not None
    assert (node.parent, node.name) == (TRASH, f.raw.hex().encode())
    assert node.heads                                   # the content is kept, only unlinked
    assert tree.names("/d") == []
    with pytest.raises(PathNotFoundError):
        tree.node("/d/f")
    tree.remove("/d")                                   # now empty
    assert tree.names() == []
    with pytest.raises(InvalidNameError):
        tree(lambda ns, t: ns.remove(t, ns.get(t, ROOT)))
    with pytest.raises(InvalidNameError):
        tree(lambda ns, t: ns.remove(t, ns.get(t, TRASH)))


# -- names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\x00b", b"\x00",
                                  b"x" * 256])
def test_check_name_refuses(name: bytes) -> None:
    with pytest.raises(InvalidNameError):
        check_name(name)


def test_check_name_limits_and_bytes() -> None:
    with pytest.raises(NameTooLongError):
        check_name("é".encode() * 128)                  # 256 bytes, 128 characters
    for ok in [b"x" * 255, b"...", b".hidden", b"a..b", b"\xff\xfe\x80", b" ", b"\\",
               "é".encode() * 127]:
        assert check_name(ok) == ok
    assert split_path("/a//b/./c/") == [b"a", b"b", b"c"]
    with pytest.raises(InvalidNameError):
        split_path("/a/../b")


def test_names_are_kept_as_bytes(memory_kv: MemoryKv) -> None:
    tree = Tree(memory_kv)
    nfc, nfd = "é".encode(), "e\u0301".encode()
    raw = b"\xff\xfebin"                                # not UTF-8
    for name in (nfc, nfd, raw):
        tree(lambda ns, t, n=name: ns.create(t, ns.get(t, ROOT), n, Kind.FILE, {}, REF, 1))
    assert sorted(tree.names()) == sorted([nfc, nfd, raw])   # no normalization merges them
    assert tree.node(b"/" + raw).name == raw
    for bad in (b"a/b", b"..", b"x" * 256):
        with pytest.raises(InvalidNameError):
            tree(lambda ns, t, n=bad: ns.create(t, ns.get(t, ROOT), n, Kind.DIR))
        with pytest.raises(InvalidNameError):
            tree(lambda ns, t, n=bad: ns.rename(t, ns.resolve(t, b"/" + raw),
                                                ns.get(t, ROOT), n))


# -- encodings -------------------------------------------------------------------------------

_keys = st.binary(min_size=24, max_size=24)
_node_ids = st.binary(min_size=16, max_size=16).map(NodeId)
_attrs = st.dictionaries(st.binary(max_size=20), st.none() | st.binary(max_size=40), max_size=4)


@st.composite
def ops(draw: st.DrawFn) -> Op:
    typ = draw(st.sampled_from(list(OpType)))
    fields: dict[str, Any] = dict(key=draw(_keys), seq=draw(st.integers(0, 2**64 - 1)),
                                  type=typ, node=draw(_node_ids), attrs=draw(_attrs))
    if typ == OpType.MOVE:
        fields.update(parent=draw(_node_ids), name=draw(st.binary(max_size=300)),
                      kind=draw(st.sampled_from(list(Kind))))
    if typ != OpType.ATTR:
        fields.update(manifest=draw(st.binary(max_size=255)),
                      size=draw(st.integers(0, 2**64 - 1)),
                      parents=tuple(draw(st.lists(_keys, max_size=4))))
    return Op(**fields)


@st.composite
def nodes(draw: st.DrawFn) -> Node:
    return Node(
        id=draw(_node_ids), kind=draw(st.sampled_from(list(Kind))),
        parent=draw(st.none() | _node_ids), name=draw(st.binary(max_size=300)),
        move_key=draw(st.just(b"") | _keys.filter(lambda k: k != bytes(24))),
        attrs=draw(st.dictionaries(st.binary(max_size=20),
                                   st.tuples(_keys, st.none() | st.binary(max_size=40)),
                                   max_size=4)),
        heads=draw(st.lists(st.builds(Version, _keys, st.binary(max_size=255),
                                      st.integers(0, 2**64 - 1)), max_size=4)))


@given(op=ops())
def test_op_encoding_round_trips(op: Op) -> None:
    buf = op.encode()
    assert Op.decode(buf) == op
    assert Op.decode(memoryview(buf)) == op
    assert op.origin == op.key[8:]


@given(node=nodes())
def test_node_encoding_round_trips(node: Node) -> None:
    assert Node.decode(node.id, node.encode()) == node


# -- version vectors -------------------------------------------------------------------------

def test_version_vector_advances_over_gaps(memory_kv: MemoryKv) -> None:
    a = Tree(memory_kv, A)
    a.mkdir("/d")
    a.mkfile("/d/f")
    a.rename("/d/f", "/g")
    assert a(lambda ns, t: ns.vv(t)) == {A: 3}
    made = a(lambda ns, t: list(ns.ops_after(t, A, 0)))
    assert [op.seq for op in made] == [1, 2, 3]
    assert [op.seq for op in a(lambda ns, t: list(ns.ops_after(t, A, 1)))] == [2, 3]
    assert [o.key for o in made] == sorted(o.key for o in made)

    b = Tree(MemoryKv(), B)
    assert b(lambda ns, t: ns.apply(t, made[2])) is True
    assert b(lambda ns, t: ns.vv(t)).get(A, 0) == 0     # 1 and 2 are still missing
    assert b(lambda ns, t: ns.apply(t, made[0])) is True
    assert b(lambda ns, t: ns.vv(t)) == {A: 1}
    assert b(lambda ns, t: ns.apply(t, made[1])) is True
    assert b(lambda ns, t: ns.vv(t)) == {A: 3}
    assert b(lambda ns, t: ns.apply(t, made[1])) is False   # a duplicate is ignored
    assert b.names() == [b"d", b"g"]
    b.mkfile("/h")                                      # B's own op follows what it has seen
    assert b(lambda ns, t: ns.vv(t)) == {A: 3, B: 1}
    mine = b(lambda ns, t: list(ns.ops_after(t, B, 0)))
    assert len(mine) == 1 and mine[0].key > made[2].key


def test_version_vector_persists_in_lmdb(lmdb_env: LmdbEnv) -> None:
    tree = Tree(lmdb_env, A)
    for i in range(5):
        tree.mkfile(f"/f{i}")
    again = Namespace(A)                                # a fresh engine over the same store
    assert lmdb_env.read(again.vv) == {A: 5}
    assert [n for n, _, _ in lmdb_env.read(lambda t: list(again.children(t, ROOT)))] == \
        [f"f{i}".encode() for i in range(5)]


# -- convergence -----------------------------------------------------------------------------

EPOCH_MS = 1_790_000_000_000
NAMES = [b"a", b"b", b"c", b"doc.txt"]
TABLES = ("nodes", "dirents", "superseded", "revived", "held", "ops")


def dump(ns: Namespace, txn: KvTxn) -> dict[str, Any]:
    """The materialized state in canonical form: each node decoded (attrs as a sorted list),
    every other table as raw rows, and the version vector."""
    out: dict[str, Any] = {t: {bytes(k): bytes(v) for k, v in txn.scan(t)} for t in TABLES}
    out["nodes"] = {}
    for k, v in txn.scan("nodes"):
        n = Node.decode(NodeId(bytes(k)), bytes(v))
        # heads keep their stored order: the last is the version shown at the name
        out["nodes"][bytes(k)] = (n.parent, n.name, n.kind, n.move_key,
                                  [(h.key, h.manifest, h.size) for h in n.heads],
                                  sorted(n.attrs.items()))
    out["vv"] = ns.vv(txn)
    return out


def check_tree(d: dict[str, Any]) -> None:
    """No cycles, heads in op order, and the dirents agree with the nodes' placements."""
    parents = {NodeId(k): v[0] for k, v in d["nodes"].items()}
    for v in d["nodes"].values():
        assert [h[0] for h in v[4]] == sorted(h[0] for h in v[4])
    for nid in parents:
        seen, x = set(), nid
        while x is not None and x not in (ROOT, TRASH):
            assert x not in seen, f"cycle through {x}"
            seen.add(x)
            x = parents.get(x)
    placed = {v[0].raw + v[1] + b"\x00" + k for k, v in d["nodes"].items() if v[0] is not None}
    revived = {v + b"\x00" + k for k, v in d["revived"].items()}
    assert set(d["dirents"]) == placed | revived
    for k in revived:
        assert NodeId(k[-16:]) in parents and parents[NodeId(k[-16:])] == TRASH


class Replica:
    """A Namespace over its own MemoryKv, on the simulated clock (plus this replica's skew)."""

    def __init__(self, n: int, wall: list[int], skew: int = 0, kv: Any = None) -> None:
        self.rid = bytes([n]) * 16
        self.kv = kv if kv is not None else MemoryKv()
        self.ns = Namespace(self.rid, HybridClock(wall_ms=lambda: wall[0] + skew))
        self.have: set[bytes] = set()
        self.sent = 0

    def receive(self, ops: list[Op], rng: random.Random) -> None:
        """Apply ops, several to a transaction at random, as a sync batch would."""
        i = 0
        while i < len(ops):
            n = rng.choice([1, 1, 2, 5])
            batch = ops[i:i + n]
            applied = self.kv.write(lambda t, b=batch: [self.ns.apply(t, o) for o in b])
            assert all(applied) or any(o.key in self.have for o in batch)
            self.have.update(o.key for o in batch)
            i += n

    def new_ops(self) -> list[Op]:
        """The ops this replica made since the last call."""
        made = self.kv.read(lambda t: list(self.ns.ops_after(t, self.rid, self.sent)))
        self.sent += len(made)
        self.have.update(o.key for o in made)
        return made

    def act(self, rng: random.Random) -> None:
        """One random local edit, the way a user or the mount would make it."""
        def run(t: KvTxn) -> None:
            ns = self.ns
            entries = []                      # (parent id, view entry) of the users' view
            stack = [ROOT]
            while stack:
                d = stack.pop()
                for e in ns.listing(t, d):
                    entries.append(e)
                    if e.kind == Kind.DIR and e.version is None:
                        stack.append(e.node)
            dirs = [ns.get(t, ROOT)] + [ns.get(t, e.node) for e in entries
                                        if e.kind == Kind.DIR and e.version is None]
            live = [e for e in entries if e.version is None]
            files = [e for e in live if e.kind == Kind.FILE]
            copies = [e for e in entries if e.version is not None]
            action = rng.choice(["mkdir", "mkdir", "create", "create", "rename", "rename",
                                 "rename", "remove", "write", "write", "attr", "copy",
                                 "unlinked"])
            name = rng.choice(NAMES)
            if action in ("mkdir", "create") or not live:
                kind = Kind.DIR if action == "mkdir" else Kind.FILE
                ns.create(t, rng.choice(dirs), name, kind, {b"mode": int_attr(0o644)},
                          _ref(rng.randbytes(4)) if kind == Kind.FILE else b"", 7)
            elif action == "rename":
                e = rng.choice(live)
                ns.rename(t, ns.get(t, e.node), rng.choice(dirs), name)
            elif action == "remove":
                ns.remove(t, ns.get(t, rng.choice(live).node))
            elif action == "write" and files:
                node = ns.get(t, rng.choice(files).node)
                ns.set_content(t, node, _ref(rng.randbytes(4)), rng.randrange(100))
            elif action == "copy" and copies:     # resolve a conflict copy: rewrite or drop it
                e = rng.choice(copies)
                node = ns.get(t, e.node)
                if rng.random() < 0.5:
                    ns.drop_version(t, node, e.version)
                else:
                    ns.set_content(t, node, _ref(rng.randbytes(4)), 3)
            elif action == "unlinked":           # a write through a handle of a deleted file
                gone = [Node.decode(NodeId(bytes(k)), bytes(v)) for k, v in t.scan("nodes")]
                gone = [n for n in gone if n.parent == TRASH and n.kind == Kind.FILE]
                if gone:
                    node = ns.get(t, rng.choice(gone).id)
                    ns.set_content(t, node, _ref(rng.randbytes(4)), 5)
            else:
                key = rng.choice([b"mode", b"mtime", b"x:user.tag"])
                value = None if rng.random() < 0.2 else int_attr(rng.randrange(1000))
                ns.set_attrs(t, ns.get(t, rng.choice(live).node), {key: value})
        try:
            self.kv.write(run)
        except CastoreError:
            pass                              # refused locally (name taken, not empty, ...)

    def dump(self) -> dict[str, Any]:
        return self.kv.read(lambda t: dump(self.ns, t))


@contextlib.contextmanager
def seeded_node_ids(rng: random.Random) -> Iterator[None]:
    with mock.patch.object(NodeId, "random", classmethod(lambda cls: cls(rng.randbytes(16)))):
        yield


def simulate(seed: int, steps: int) -> tuple[list[Replica], list[Op], list[int]]:
    """Three replicas edit concurrently, syncing partially now and then. Returns the
    replicas, every op made, and the simulated clock."""
    rng = random.Random(seed)
    wall = [EPOCH_MS]
    replicas = [Replica(i + 1, wall, skew=rng.randrange(-1500, 1500)) for i in range(3)]
    log: list[Op] = []
    base = replicas[0]
    for name in NAMES[:3]:              # a shared start, so concurrent moves can form cycles
        base.kv.write(lambda t, n=name: base.ns.create(t, base.ns.get(t, ROOT), n, Kind.DIR))
    log += base.new_ops()
    for r in replicas[1:]:
        r.receive(log, rng)
    for _ in range(steps):
        wall[0] += rng.choice([0, 0, 1, 5, 400])
        r = rng.choice(replicas)
        if rng.random() < 0.3:           # receive part of what the others made, in any order
            missing = [o for o in log if o.key not in r.have]
            r.receive(rng.sample(missing, k=rng.randint(0, len(missing))), rng)
        for _ in range(rng.randint(1, 3)):
            r.act(rng)
        log += r.new_ops()
    return replicas, log, wall


def check_convergence(seed: int, steps: int) -> int:
    """Simulate, then replay the whole log on fresh replicas in five orders and let the
    editing replicas catch up; every state must be the same. Returns the number of ops."""
    rng = random.Random(seed ^ 0x5EED)
    with seeded_node_ids(random.Random(seed)):
        replicas, log, wall = simulate(seed, steps)
        orders = [sorted(log, key=lambda o: o.key), sorted(log, key=lambda o: o.key)[::-1]]
        orders += [rng.sample(log, len(log)) for _ in range(3)]
        dumps = []
        for i, order in enumerate(orders):
            fresh = Replica(10 + i, wall)
            fresh.receive(order, rng)
            dumps.append(fresh.dump())
        for r in replicas:
            missing = [o for o in log if o.key not in r.have]
            r.receive(rng.sample(missing, len(missing)), rng)
            dumps.append(r.dump())
    first = dumps[0]
    check_tree(first)
    assert first["held"] == {}
    assert first["vv"] == {r.rid: r.sent for r in replicas if r.sent}
    assert len(first["ops"]) == len(log)
    for i, d in enumerate(dumps[1:], 1):
        for table in first:
            assert d[table] == first[table], f"replica {i} differs from replica 0 in {table}"
    return len(log)


@settings(max_examples=settings.default.max_examples * 8 // 5)    # 40 under "ci"
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(5, 40))
def test_replicas_converge_in_any_delivery_order(seed: int, steps: int) -> None:
    """Every replica that ends with the same set of ops has the same tree, whatever the
    order they arrived in. The falsifying seed and steps replay a run, but the engine also
    iterates sets of node ids, whose order follows PYTHONHASHSEED: if a printed case passes
    on replay, try it under a few fixed PYTHONHASHSEED values."""
    note(f"seed={seed} steps={steps}")
    check_convergence(seed, steps)


def test_concurrent_moves_that_would_form_a_cycle_converge() -> None:
    """A moves /a under /b while B moves /b under /a: one move wins everywhere."""
    wall = [EPOCH_MS]
    rng = random.Random(0)
    a, b = Replica(1, wall), Replica(2, wall)
    for name in (b"a", b"b"):
        a.kv.write(lambda t, n=name: a.ns.create(t, a.ns.get(t, ROOT), n, Kind.DIR))
    b.receive(a.new_ops(), rng)
    a.kv.write(lambda t: a.ns.rename(t, a.ns.resolve(t, "/a"), a.ns.resolve(t, "/b"), b"a"))
    b.kv.write(lambda t: b.ns.rename(t, b.ns.resolve(t, "/b"), b.ns.resolve(t, "/a"), b"b"))
    from_a, from_b = a.new_ops(), b.new_ops()
    a.receive(from_b, rng)
    b.receive(from_a, rng)
    da, db = a.dump(), b.dump()
    assert da == db
    check_tree(da)
    earlier, later = sorted(from_a + from_b, key=lambda o: o.key)
    # the earlier move stands; the later one would close a cycle and is skipped
    top = a.kv.read(lambda t: list(a.ns.children(t, ROOT)))
    assert [nid for _, nid, _ in top] == [later.node]
    inside = a.kv.read(lambda t: list(a.ns.children(t, later.node)))
    assert [nid for _, nid, _ in inside] == [earlier.node]


def test_writing_a_file_shown_again_after_a_concurrent_delete_keeps_it() -> None:
    """An edit beats a concurrent delete, so the file shows again at its old place; writing it
    there again must keep it there (it once vanished: the revived entry and the real one
    share a dirent key, and the refresh deleted it)."""
    wall = [EPOCH_MS]
    rng = random.Random(0)
    a, b = Replica(1, wall), Replica(2, wall)
    a.kv.write(lambda t: a.ns.create(t, a.ns.get(t, ROOT), b"doc.txt", Kind.FILE, {},
                                     _ref(b"0"), 1))
    b.receive(a.new_ops(), rng)
    a.kv.write(lambda t: a.ns.remove(t, a.ns.resolve(t, "/doc.txt")))
    b.kv.write(lambda t: b.ns.set_content(t, b.ns.resolve(t, "/doc.txt"), _ref(b"b"), 2))
    from_a, from_b = a.new_ops(), b.new_ops()
    a.receive(from_b, rng)
    b.receive(from_a, rng)
    for r in (a, b):
        assert r.kv.read(lambda t, r=r: [n for n, _, _ in r.ns.children(t, ROOT)]) == \
            [b"doc.txt"]
    a.kv.write(lambda t: a.ns.set_content(t, a.ns.resolve(t, "/doc.txt"), _ref(b"a"), 3))
    b.receive(a.new_ops(), rng)
    for r in (a, b):
        node = r.kv.read(lambda t, r=r: r.ns.resolve(t, "/doc.txt"))
        assert node.parent == ROOT
        assert node.head is not None and node.head.manifest == _ref(b"a")
    assert a.dump() == b.dump()
    check_tree(a.dump())


def test_replay_on_lmdb_matches_memory(tmp_path: Path) -> None:
    """The same ops replayed through LMDB give the same state as through MemoryKv."""
    with seeded_node_ids(random.Random(3)):
        replicas, log, wall = simulate(3, 25)
        rng = random.Random(4)
        mem = Replica(20, wall)
        mem.receive(rng.sample(log, len(log)), rng)
        env = LmdbEnv(tmp_path / "replay")
        try:
            disk = Replica(21, wall, kv=env)
            disk.receive(rng.sample(log, len(log)), rng)
            assert disk.dump() == mem.dump()
        finally:
            env.close()


def test_readers_of_one_snapshot_share_the_nodes_they_decode(
        lmdb_env: LmdbEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node decoded by one read transaction serves the next one of the same snapshot; a
    commit starts afresh (the next reader decodes the new record), and so does a memo that
    grew past its bound."""
    t = Tree(lmdb_env)
    nid = t.mkfile("/f")
    decoded: list[NodeId] = []
    real = Node.decode

    def counting(node_id: NodeId, buf: Any) -> Node:
        decoded.append(node_id)
        return real(node_id, buf)
    monkeypatch.setattr(Node, "decode", staticmethod(counting))

    def size() -> int:
        node = lmdb_env.read(lambda txn: t.ns.get(txn, nid))
        assert node is not None and node.head is not None
        return node.head.size
    assert size() == 1 and size() == 1
    assert decoded == [nid]                      # once for both readers
    t(lambda ns, txn: ns.set_content(txn, ns.get(txn, nid), _ref(b"x"), 7))
    decoded.clear()
    assert size() == 7 and size() == 7
    assert decoded == [nid]                      # the commit made a new snapshot
    monkeypatch.setattr("castore.store.lmdb.MEMO_ENTRIES", 0)
    decoded.clear()
    for _ in range(200):
        assert size() == 7
    assert 2 <= len(decoded) <= 5                # over the bound: started afresh now and then


def test_the_memo_size_check_survives_a_reader_adding_to_the_memo(lmdb_env: LmdbEnv) -> None:
    """Readers of one snapshot share the memo, so another thread may add to it while one
    measures it: the measure must not fail on a dict changing size under it."""
    memo: dict[str, object] = {}

    class Grows:
        def __len__(self) -> int:        # another reader adds its part meanwhile
            memo[f"other-{len(memo)}"] = {}
            return 1
    memo["a"] = Grows()
    tid = int(lmdb_env.env.info()["last_txnid"])
    lmdb_env._memo = (tid, memo)
    lmdb_env._memo_reads = 63                    # the next read measures the memo
    assert lmdb_env.read(lambda txn: txn.txn_id()) == tid
