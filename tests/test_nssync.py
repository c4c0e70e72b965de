"""Namespace sync over in-process peers with real LMDB repos: push on commit, pull by version
vectors after a partition, snapshot bootstrap. (The same loop runs over the peer service
between daemons; see the cluster tests.)"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from castore.config import Config
from castore.ids import ChunkId
from castore.nssync import LocalOpPeer, NamespaceSync, changed_paths
from castore.ops import Kind, Op
from castore.repo import IngestItem, Repo


class Net:
    """Who can reach whom: a partition is a set of cut links."""

    def __init__(self) -> None:
        self.syncs: dict[str, NamespaceSync] = {}
        self.cut: set[frozenset[str]] = set()
        self.stalled: set[str] = set()       # peers whose calls wait until `resumed`
        self.resumed = threading.Event()

    def peers_of(self, me: str):  # type: ignore[no-untyped-def]
        def peers() -> dict[str, LocalOpPeer]:
            return {n: (Stalled(s, self.resumed) if n in self.stalled else
                        LocalOpPeer(s.repo, s)) for n, s in self.syncs.items()
                    if n != me and frozenset((me, n)) not in self.cut}
        return peers


class Stalled(LocalOpPeer):
    """A peer that takes calls but answers none until resumed (a suspended machine)."""

    def __init__(self, sync: NamespaceSync, resumed: threading.Event) -> None:
        super().__init__(sync.repo, sync)
        self.resumed = resumed

    def push_ops(self, ops: list[Op]) -> int:
        self.resumed.wait(30)
        return super().push_ops(ops)

    def pull_ops(self, vv: dict[bytes, int]) -> list[Op]:
        self.resumed.wait(30)
        return super().pull_ops(vv)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Net, dict[str, Repo]]]:
    net = Net()
    repos: dict[str, Repo] = {}
    try:
        for name in "abc":
            repos[name] = Repo.init(Config.load(tmp_path / name))
            net.syncs[name] = NamespaceSync(repos[name], net.peers_of(name), interval=0.3)
        yield net, repos
    finally:
        for s in net.syncs.values():
            s.stop()
        for r in repos.values():
            r.close()


def put(repo: Repo, path: str, data: bytes) -> None:
    [res] = list(repo.ingest([IngestItem(path, data=data, size=len(data))]))
    assert not res.error, res.error


def names(repo: Repo, path: str = "/") -> list[str]:
    return [e.name for e in repo.listdir(path)]


def wait_for(cond, timeout: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_commit_reaches_the_other_peers_at_once(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    for s in net.syncs.values():
        s.start()
    put(repos["a"], "/hello.txt", b"hi")
    took = wait_for(lambda: names(repos["b"]) == ["hello.txt"] and
                    names(repos["c"]) == ["hello.txt"], timeout=2.0)
    assert took < 2.0
    repos["b"].rename("/hello.txt", "/moved.txt")
    wait_for(lambda: names(repos["a"]) == names(repos["c"]) == ["moved.txt"], timeout=2.0)
    repos["c"].remove("/moved.txt")
    wait_for(lambda: names(repos["a"]) == names(repos["b"]) == [], timeout=2.0)


def test_a_stalled_peer_holds_up_no_other(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    net.stalled.add("b")
    for n in "ac":                           # b is suspended: its own loops do not run
        net.syncs[n].start()
    try:
        for i in range(3):
            put(repos["a"], f"/f{i}.txt", b"x")
            wait_for(lambda: f"f{i}.txt" in names(repos["c"]), timeout=1.0)
        assert names(repos["b"]) == []
    finally:
        net.resumed.set()
    net.syncs["b"].start()
    wait_for(lambda: names(repos["b"]) == names(repos["a"]), timeout=5.0)


def test_a_peer_that_left_keeps_no_sender(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    sync = net.syncs["a"]
    sync.start()
    put(repos["a"], "/one.txt", b"1")
    wait_for(lambda: "one.txt" in names(repos["b"]), timeout=2.0)
    thread = sync._senders["b"].thread
    net.cut = {frozenset("ab")}
    put(repos["a"], "/two.txt", b"2")
    wait_for(lambda: "two.txt" in names(repos["c"]), timeout=2.0)
    thread.join(5)
    assert not thread.is_alive() and "b" not in sync._senders
    net.cut = set()
    put(repos["a"], "/three.txt", b"3")                 # back: a new sender
    wait_for(lambda: "three.txt" in names(repos["b"]), timeout=2.0)


def test_a_stalled_peer_holds_up_no_pull(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    put(repos["a"], "/own.txt", b"a")        # not empty: a pulls rather than bootstraps
    put(repos["c"], "/f.txt", b"x")
    net.stalled.add("b")                     # a asks b first, and c after PULL_PATIENCE
    round_ = threading.Thread(target=net.syncs["a"].sync_once, daemon=True)
    round_.start()
    try:
        wait_for(lambda: "f.txt" in names(repos["a"]), timeout=3.0)
        assert round_.is_alive()             # the round still waits for b
    finally:
        net.resumed.set()
    round_.join(10)


def test_after_a_partition_heals_every_version_is_kept(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    put(repos["a"], "/shared.txt", b"v0")
    for s in net.syncs.values():
        s.sync_once()
    assert names(repos["b"]) == ["shared.txt"]
    net.cut = {frozenset("ab"), frozenset("ac"), frozenset("bc")}
    put(repos["a"], "/shared.txt", b"from a")
    put(repos["b"], "/shared.txt", b"from b")
    put(repos["c"], "/only-c.txt", b"c")
    repos["a"].mkdir("/dir-a")
    net.cut = set()
    for _ in range(2):
        for s in net.syncs.values():
            s.sync_once()
    views = {n: names(r) for n, r in repos.items()}
    assert views["a"] == views["b"] == views["c"], views
    listing = views["a"]
    assert "only-c.txt" in listing and "dir-a" in listing and "shared.txt" in listing
    copies = [n for n in listing if ".sync-conflict-" in n]
    assert len(copies) == 1
    # chunks travel by replication (the cluster's job), so compare content ids here
    ids = {repos["c"].stat("/" + n).content for n in ("shared.txt", copies[0])}
    assert ids == {ChunkId.of(b"from a").hex, ChunkId.of(b"from b").hex}


class PushedDuringSnapshot(LocalOpPeer):
    """A peer whose snapshot is read while one of its ops is pushed to the reader: by the
    time the snapshot is loaded, the reader's namespace is no longer empty."""

    def __init__(self, sync: NamespaceSync, reader: NamespaceSync) -> None:
        super().__init__(sync.repo, sync)
        self.reader = reader

    def snapshot(self) -> Iterator[tuple[str, bytes, bytes]]:
        rows = list(super().snapshot())
        self.reader.receive(self.repo.ops_since({})[-1:])
        return iter(rows)


class Counting(LocalOpPeer):
    """Counts the ops its pulls return."""

    def __init__(self, sync: NamespaceSync) -> None:
        super().__init__(sync.repo, sync)
        self.pulled = 0

    def pull_ops(self, vv: dict[bytes, int]) -> list[Op]:
        ops = super().pull_ops(vv)
        self.pulled += len(ops)
        return ops


def test_a_round_pulls_each_op_once_from_peers_that_answer(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    put(repos["a"], "/own.txt", b"a")        # not empty: a pulls rather than bootstraps
    for i in range(30):
        put(repos["c"], f"/d/f{i}", b"x")
    first, second = Counting(net.syncs["c"]), Counting(net.syncs["c"])   # both hold them
    net.syncs["a"].sync_once({"b": first, "c": second})
    assert len(names(repos["a"], "/d")) == 30
    assert first.pulled >= 30 and second.pulled == 0


def test_a_push_during_the_bootstrap_falls_back_to_the_log(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    for i in range(20):
        put(repos["a"], f"/d/f{i}", b"x")
    b = net.syncs["b"]
    b.sync_once({"a": PushedDuringSnapshot(net.syncs["a"], b)})
    assert names(repos["b"], "/d") == names(repos["a"], "/d")
    assert len(names(repos["b"], "/d")) == 20


def test_a_new_peer_bootstraps_from_a_snapshot_then_the_tail(cluster) -> None:  # type: ignore[no-untyped-def]
    net, repos = cluster
    for i in range(50):
        put(repos["a"], f"/d/f{i}", b"x")
    net.cut = {frozenset("ac"), frozenset("bc")}
    net.syncs["b"].sync_once()
    net.cut = set()
    c = net.syncs["c"]
    c.sync_once()
    assert c.status.bootstrapped_from in ("a", "b")
    assert names(repos["c"], "/d") == names(repos["a"], "/d")
    put(repos["a"], "/after.txt", b"tail")
    c.sync_once()
    assert "after.txt" in names(repos["c"])
    assert repos["c"].version_vector() == repos["a"].version_vector()


@pytest.mark.parametrize("local", [False, True])
def test_changed_paths_name_every_place_an_op_touched(repo: Repo, local: bool) -> None:
    """The paths a mount drops from its kernel caches: a new file and its directory, the
    places a file left when moved or deleted, and the new place; the same whether worked out
    from the nodes (ops from other peers) or from the moves themselves (ops made here)."""
    seen: list[list[Op]] = []
    repo.add_listener(lambda ops, is_local: seen.append(list(ops)))
    repo.mkdir("/d")
    list(repo.ingest([IngestItem("/d/a", Kind.FILE, data=b"a"),
                      IngestItem("/d/sub/b", Kind.FILE, data=b"b")]))
    repo.rename("/d/a", "/d/sub/c")
    repo.remove("/d/sub/b")
    ops = [op for batch in seen for op in batch]
    got = changed_paths(repo, ops, local=local)
    assert {b"/d", b"/d/a", b"/d/sub", b"/d/sub/b", b"/d/sub/c"} <= got.nodes
    assert {(b"/d", b"a"), (b"/d", b"sub"), (b"/d/sub", b"b"), (b"/d/sub", b"c")} <= got.names
