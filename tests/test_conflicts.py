"""Concurrent edits across replicas: conflict copies, edit beats delete, resolution, and the
clock-skew guard. Replicas are Namespace engines over MemoryKv; ops travel by hand, in every
order, so each case is checked for convergence as well as for what users see."""
from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from castore.hlc import HybridClock
from castore.namespace import CONFLICT_TAG, Kind, Namespace, Op, conflict_name
from castore.store import MemoryKv
from castore.store.memory import _MemoryTxn


class Replica:
    def __init__(self, n: int, wall: Callable[[], int] | None = None) -> None:
        self.ns = Namespace(bytes([n]) * 16, HybridClock(wall_ms=wall))
        self.kv = MemoryKv()

    def do(self, fn: Callable[[Namespace, _MemoryTxn], object]) -> list[Op]:
        """Run a local action; return the ops it made."""
        def run(t: _MemoryTxn) -> list[Op]:
            before = {k for k, _ in t.scan("ops")}
            fn(self.ns, t)
            return [_op(v) for k, v in t.scan("ops") if k not in before]
        return self.kv.write(run)

    def receive(self, ops: list[Op]) -> None:
        for op in ops:
            self.kv.write(lambda t, o=op: self.ns.apply(t, o))

    def view(self, path: str = "/") -> list[tuple[bytes, bool]]:
        def run(t: _MemoryTxn) -> list[tuple[bytes, bool]]:
            node, _ = self.ns.resolve_view(t, path)
            return [(e.name, e.version is not None) for e in self.ns.listing(t, node.id)]
        return self.kv.read(run)

    def state(self) -> dict[str, dict[bytes, bytes]]:
        return {db: dict(t) for db, t in self.kv.dbs.items() if db in ("nodes", "dirents")}


def _op(raw: bytes) -> Op:
    n = int.from_bytes(raw[:4], "little")
    return Op.decode(raw[4:4 + n])


def create(path: str, ref: bytes = b"C" + b"1" * 32, size: int = 1, kind: Kind = Kind.FILE
           ) -> Callable[[Namespace, _MemoryTxn], object]:
    def fn(ns: Namespace, t: _MemoryTxn) -> object:
        parent, name = ns.resolve_parent(t, path)
        return ns.create(t, parent, name, kind, {}, ref if kind == Kind.FILE else b"", size)
    return fn


def write(path: str, ref: bytes, size: int = 1) -> Callable[[Namespace, _MemoryTxn], object]:
    return lambda ns, t: ns.set_content(t, ns.resolve_view(t, path)[0], ref, size)


def remove(path: str) -> Callable[[Namespace, _MemoryTxn], object]:
    def fn(ns: Namespace, t: _MemoryTxn) -> object:
        node, version = ns.resolve_view(t, path)
        if version is not None:
            return ns.drop_version(t, node, version)
        return ns.remove(t, node)
    return fn


def converge_all_orders(base: list[Op], branches: list[list[Op]], n: int = 3) -> Replica:
    """Apply base then the branch ops in every interleaving of branches on fresh replicas;
    assert identical state; return one of them."""
    states = []
    first = None
    for order in itertools.permutations(range(len(branches))):
        r = Replica(90 + len(states))
        r.receive(base)
        for i in order:
            r.receive(branches[i])
        states.append(r.state())
        first = first or r
    assert all(s == states[0] for s in states), "replicas diverged"
    assert first is not None
    return first


def test_concurrent_writes_keep_every_version_as_conflict_copies() -> None:
    a, b = Replica(1), Replica(2)
    base = a.do(create("/notes.txt"))
    b.receive(base)
    wa = a.do(write("/notes.txt", b"C" + b"a" * 32, 2))
    wb = b.do(write("/notes.txt", b"C" + b"b" * 32, 3))
    a.receive(wb)
    b.receive(wa)
    assert a.view() == b.view()
    names = [n for n, _ in a.view()]
    assert b"notes.txt" in names
    copies = [n for n, is_copy in a.view() if is_copy]
    assert len(copies) == 1 and copies[0].startswith(b"notes.sync-conflict-")
    assert copies[0].endswith(b".txt")
    # the newest version stays at the name
    newest = max(wa + wb, key=lambda o: o.key)
    shown = a.kv.read(lambda t: a.ns.resolve_view(t, "/notes.txt")[0].head)
    assert shown is not None and shown.key == newest.key
    converge_all_orders(base, [wa, wb])


def test_writing_or_deleting_the_conflict_copy_resolves_it_everywhere() -> None:
    for resolve in ("write", "delete"):
        a, b = Replica(1), Replica(2)
        base = a.do(create("/f"))
        b.receive(base)
        wa, wb = a.do(write("/f", b"C" + b"a" * 32)), b.do(write("/f", b"C" + b"b" * 32))
        a.receive(wb)
        b.receive(wa)
        copy = next(n for n, c in a.view() if c).decode()
        fix = a.do(write("/" + copy, b"C" + b"c" * 32) if resolve == "write" else remove("/" + copy))
        b.receive(fix)
        assert a.view() == b.view() == [(b"f", False)], resolve


def test_an_edit_beats_a_concurrent_delete() -> None:
    a, b = Replica(1), Replica(2)
    base = a.do(create("/doc.txt"))
    b.receive(base)
    delete = a.do(remove("/doc.txt"))
    edit = b.do(write("/doc.txt", b"C" + b"e" * 32, 9))
    a.receive(edit)
    b.receive(delete)
    assert a.view() == b.view() == [(b"doc.txt", False)]
    size = a.kv.read(lambda t: a.ns.resolve_view(t, "/doc.txt")[0].head)
    assert size is not None and size.size == 9
    converge_all_orders(base, [delete, edit])


def test_a_deleted_directory_that_gains_an_entry_shows_again() -> None:
    a, b = Replica(1), Replica(2)
    base = a.do(create("/dir", kind=Kind.DIR))
    b.receive(base)
    delete = a.do(remove("/dir"))
    add = b.do(create("/dir/new.txt"))
    a.receive(add)
    b.receive(delete)
    assert a.view() == b.view() == [(b"dir", False)]
    assert a.view("/dir") == [(b"new.txt", False)]
    converge_all_orders(base, [delete, add])


def test_a_delete_after_seeing_the_edit_wins() -> None:
    a, b = Replica(1), Replica(2)
    base = a.do(create("/x"))
    b.receive(base)
    edit = b.do(write("/x", b"C" + b"e" * 32))
    a.receive(edit)
    delete = a.do(remove("/x"))
    b.receive(delete)
    assert a.view() == b.view() == []


def test_writing_an_unlinked_file_through_its_handle_keeps_it_deleted() -> None:
    a = Replica(1)
    made = a.do(create("/tmpfile"))
    nid = made[0].node
    a.do(remove("/tmpfile"))
    a.do(lambda ns, t: ns.set_content(t, ns.get(t, nid), b"C" + b"z" * 32, 4))
    assert a.view() == []


def test_concurrent_creates_of_one_name_both_stay() -> None:
    a, b = Replica(1), Replica(2)
    ca = a.do(create("/same.txt", b"C" + b"a" * 32))
    cb = b.do(create("/same.txt", b"C" + b"b" * 32))
    a.receive(cb)
    b.receive(ca)
    assert a.view() == b.view()
    names = [n for n, _ in a.view()]
    assert len(names) == 2 and b"same.txt" in names
    assert any(CONFLICT_TAG in n for n in names)
    converge_all_orders([], [ca, cb])


def test_conflict_names_follow_syncthing_and_fit_the_limit() -> None:
    key = (1_700_000_000_000 << 16).to_bytes(8, "big") + bytes.fromhex("ab" * 16)
    assert conflict_name(b"report.pdf", key) == b"report.sync-conflict-20231114-221320-ababab" \
        b"a.pdf"
    assert conflict_name(b".bashrc", key).startswith(b".bashrc.sync-conflict-")
    assert len(conflict_name(b"x" * 250 + b".txt", key)) <= 255


def test_ops_from_a_clock_far_ahead_are_held_and_flagged() -> None:
    now = [1_800_000_000_000]
    fast = Replica(1, wall=lambda: now[0] + 10 * 60 * 1000)     # ten minutes ahead
    slow = Replica(2, wall=lambda: now[0])
    ops = fast.do(create("/future.txt"))
    slow.receive(ops)
    assert slow.view() == []
    assert [o.key for o in slow.kv.read(slow.ns.held)] == [o.key for o in ops]
    now[0] += 6 * 60 * 1000                                      # time catches up
    assert slow.kv.write(slow.ns.release_held) == 1
    assert slow.view() == [(b"future.txt", False)]
    assert slow.kv.read(slow.ns.held) == []


@pytest.mark.parametrize("seed", range(5))
def test_random_concurrent_sessions_converge(seed: int) -> None:
    import random
    rng = random.Random(seed)
    replicas = [Replica(i + 1) for i in range(3)]
    base = replicas[0].do(create("/d", kind=Kind.DIR)) + replicas[0].do(create("/d/f"))
    for r in replicas[1:]:
        r.receive(base)
    branches: list[list[Op]] = []
    for r in replicas:
        ops: list[Op] = []
        for _ in range(6):
            names = [n.decode() for n, _ in r.view("/d")] if r.view() else []
            choice = rng.choice(["write", "create", "remove", "rename"])
            try:
                if choice == "write" and names:
                    ops += r.do(write("/d/" + rng.choice(names), b"C" + rng.randbytes(32)))
                elif choice == "create":
                    ops += r.do(create(f"/d/n{rng.randrange(4)}"))
                elif choice == "remove" and names:
                    ops += r.do(remove("/d/" + rng.choice(names)))
                elif choice == "rename" and names:
                    src = rng.choice(names)
                    ops += r.do(lambda ns, t, s=src: ns.rename(
                        t, ns.resolve_view(t, "/d/" + s)[0], ns.resolve(t, "/d"),
                        f"m{rng.randrange(3)}".encode()))
            except Exception as exc:  # a local refusal (e.g. a name that is taken) is fine
                assert type(exc).__module__ == "castore.errors", (seed, exc)
        branches.append(ops)
    converge_all_orders(base, branches)
