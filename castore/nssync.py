"""Namespace sync between peers: every committed local op is pushed at once to the peers
reachable now (by one sender per peer); every few seconds, and whenever a peer (re)appears,
each peer pulls the ops it lacks from one peer after another (the next starts when the one
before answered or after PULL_PATIENCE) by comparing version vectors (exact: per origin, the
highest contiguous sequence number); a peer with an empty namespace first loads a snapshot,
then pulls the tail. Ops from clocks too far ahead are held by the
namespace and released here once their time comes. changed_paths says which paths of this
peer's tree a batch of applied ops changed (the drive drops the kernel's caches of those).

Talks to peers only through the OpPeer interface (an adapter in castore.rpc implements it over
the peer service), so it runs in tests over in-process peers. Must not import grpc or
castore._proto.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

from castore.errors import CastoreError, RepoError
from castore.ids import ROOT, TRASH, NodeId
from castore.namespace import conflict_name, entry_undo
from castore.ops import Kind, Op, OpType
from castore.repo import Repo
from castore.store.lmdb import LmdbTxn

log = logging.getLogger(__name__)
PUSH_BATCH = 1000
PULLS_AT_ONCE = 8           # peers pulled from at once at most, when some stall
PULL_PATIENCE = 1.0         # seconds a round waits on one peer's pull before the next starts
PUSH_BACKLOG = 100_000      # ops waiting for one peer at most; past that they are dropped and
                            # that peer's pull catches up


class OpPeer(Protocol):
    """One peer's namespace endpoints. Every call has a deadline and raises CastoreError
    (PeerUnavailableError when the peer cannot be reached)."""

    def push_ops(self, ops: list[Op]) -> int: ...
    def pull_ops(self, vv: dict[bytes, int]) -> list[Op]: ...
    def snapshot(self) -> Iterator[tuple[str, bytes, bytes]]: ...


@dataclass
class SyncStatus:
    pushed: int = 0
    pulled: int = 0
    rounds: int = 0
    held: int = 0
    last_round: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)
    bootstrapped_from: str = ""


class NamespaceSync:
    """Keeps this repo's namespace in step with its peers'. peers() returns the peers that are
    reachable now, keyed by a stable name (the peer id)."""

    def __init__(self, repo: Repo, peers: Callable[[], dict[str, OpPeer]],
                 interval: float = 2.0) -> None:
        self.repo = repo
        self.peers = peers
        self.interval = interval
        self.status = SyncStatus()
        self._queue: list[Op] = []
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._known: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._senders: dict[str, _Sender] = {}
        self._status_mutex = threading.Lock()
        # the pulls of a round: a peer that stalls holds up no other (see sync_once)
        self._pullers = ThreadPoolExecutor(PULLS_AT_ONCE, thread_name_prefix="castore-ns-pull")
        # called after a snapshot was loaded (it applies no ops, so listeners hear nothing)
        self.on_snapshot: list[Callable[[], None]] = []
        repo.add_listener(self._on_ops)

    def start(self) -> None:
        for target, name in ((self._push_loop, "castore-ns-push"),
                             (self._pull_loop, "castore-ns-pull")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        self._pullers.shutdown(wait=False, cancel_futures=True)     # pulls not yet begun
        senders = list(self._senders.values())
        for sender in senders:
            sender.wake()
        for t in self._threads + [s.thread for s in senders]:
            t.join(5)

    # -- receiving (called by the peer service) -------------------------------------------
    def receive(self, ops: list[Op]) -> int:
        """Ops pushed by a peer: apply what is new."""
        return self.repo.apply_ops(ops)

    # -- pushing --------------------------------------------------------------------------
    def _on_ops(self, ops: list[Op], local: bool) -> None:
        if not local:
            return
        with self._wake:
            self._queue.extend(ops)
            self._wake.notify_all()

    def _push_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                while not self._queue and not self._stop.is_set():
                    self._wake.wait(1.0)
                batch, self._queue = self._queue[:PUSH_BATCH], self._queue[PUSH_BATCH:]
            if batch:
                peers = self.peers()
                for name, peer in peers.items():
                    sender = self._senders.get(name)
                    if sender is None:
                        sender = self._senders[name] = _Sender(self, name)
                    sender.offer(peer, batch)
                for name in set(self._senders) - set(peers):   # gone: its thread ends too
                    self._senders.pop(name).close()

    def _push_to(self, name: str, peer: OpPeer, batch: list[Op]) -> None:
        try:
            peer.push_ops(batch)
        except CastoreError as exc:   # the pull loop of that peer will catch up
            self.status.errors[name] = str(exc)
            return
        with self._status_mutex:
            self.status.pushed += len(batch)

    # -- pulling --------------------------------------------------------------------------
    def _pull_loop(self) -> None:
        next_round = 0.0
        while not self._stop.is_set():
            peers = self.peers()
            fresh = set(peers) - self._known
            if fresh or time.monotonic() >= next_round:
                try:
                    self.sync_once(peers)
                except Exception:  # a bug in one round must not end anti-entropy
                    log.exception("namespace sync round failed")
                next_round = time.monotonic() + self.interval
            self._known = set(peers)
            self._stop.wait(min(0.25, self.interval))

    def sync_once(self, peers: dict[str, OpPeer] | None = None) -> int:
        """One anti-entropy round: bootstrap if empty, pull from every peer, release held
        ops. Returns how many ops were applied."""
        peers = self.peers() if peers is None else peers
        applied = 0
        if peers and not self.repo.version_vector():
            applied += self._bootstrap(peers)
        # one peer after another, so that a pull asks only for what the ones before did not
        # bring; a peer that does not answer within PULL_PATIENCE is left to finish beside
        # the next
        pulls = []
        try:
            for name, peer in peers.items():
                pulls.append(self._pullers.submit(self._pull_from, name, peer))
                wait(pulls[-1:], timeout=PULL_PATIENCE)
            applied += sum(f.result() for f in pulls)
        except (RuntimeError, CancelledError):      # stopped meanwhile
            return applied
        try:
            applied += self.repo.release_held()
            self.status.held = len(self.repo.env.read(self.repo.ns.held))
        except CastoreError as exc:
            log.warning("releasing held ops failed: %s", exc)
        self.status.rounds += 1
        self.status.last_round = time.time()
        return applied

    def _pull_from(self, name: str, peer: OpPeer) -> int:
        """Pull and apply what peer has and this one lacks; returns how many ops applied."""
        applied = 0
        try:
            while True:
                ops = peer.pull_ops(self.repo.version_vector())
                if not ops:
                    break
                n = self.repo.apply_ops(ops)
                applied += n
                if n == 0:        # nothing new (e.g. all held): do not spin
                    break
            self.status.errors.pop(name, None)
        except CastoreError as exc:
            self.status.errors[name] = str(exc)
        with self._status_mutex:
            self.status.pulled += applied
        return applied

    def _bootstrap(self, peers: dict[str, OpPeer]) -> int:
        for name, peer in peers.items():
            try:
                rows = list(peer.snapshot())
            except CastoreError as exc:
                self.status.errors[name] = str(exc)
                continue
            if not rows:
                continue
            try:
                self.repo.import_snapshot(rows)
            except RepoError as exc:
                # ops pushed here (or made here) meanwhile: the namespace is no longer
                # empty, and the whole log is pulled instead of the snapshot
                log.info("namespace snapshot from %s not loaded (%s); pulling the log "
                         "instead", name[:10], exc)
                return 0
            self.status.bootstrapped_from = name
            for fn in list(self.on_snapshot):
                fn()
            return len(rows)
        return 0


class _Sender:
    """The ops on their way to one peer, pushed in order by a thread of its own: a peer that
    stalls holds up no other. A push that fails is not retried (that peer's pull catches
    up), and neither is a backlog past PUSH_BACKLOG."""

    def __init__(self, sync: NamespaceSync, name: str) -> None:
        self._sync = sync
        self._name = name
        self._peer: OpPeer | None = None
        self._ops: deque[Op] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._run, name=f"castore-ns-push-{name[:8]}",
                                       daemon=True)
        self.thread.start()

    def offer(self, peer: OpPeer, ops: list[Op]) -> None:
        with self._cond:
            self._peer = peer
            if len(self._ops) + len(ops) > PUSH_BACKLOG:
                self._ops.clear()
                self._sync.status.errors[self._name] = "push backlog dropped (it pulls instead)"
            else:
                self._ops.extend(ops)
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """The peer left: what waits for it is dropped (its pull catches up if it returns)."""
        with self._cond:
            self._closed = True
            self._ops.clear()
            self._cond.notify()

    def _run(self) -> None:
        stop = self._sync._stop
        while not stop.is_set() and not self._closed:
            with self._cond:
                while not self._ops and not stop.is_set() and not self._closed:
                    self._cond.wait(1.0)
                batch = [self._ops.popleft() for _ in range(min(PUSH_BATCH, len(self._ops)))]
                peer = self._peer
            if batch and peer is not None and not stop.is_set():
                self._sync._push_to(self._name, peer, batch)


@dataclass
class Changed:
    """Paths of this peer's tree that applied ops changed. nodes: files and directories whose
    attributes, content or entries changed; names: (directory, name) pairs that appeared,
    went away or now name another node. Paths are bytes, absolute, as users see them
    (conflict copies by their conflict names)."""

    nodes: set[bytes] = field(default_factory=set)
    names: set[tuple[bytes, bytes]] = field(default_factory=set)

    def add(self, path: bytes) -> None:
        """A node at path changed, and so did its name and its directory."""
        parent, name = _split(path)
        self.nodes.add(path)
        if name:
            self.nodes.add(parent)
            self.names.add((parent, name))


def changed_paths(repo: Repo, ops: list[Op], max_paths: int = 100_000,
                  local: bool = False) -> Changed:
    """Where ops just applied here show in the tree: each node's path now and, for a move,
    the place it left (from the op's undo record). Stops adding after max_paths.

    local: the ops were made on this peer, newer than any other, so a move's new place is
    the one it names (its directory's path and its name): no lookup of the node, which is
    most of the cost of an add of many files. (A name it lost to a concurrent op from
    another peer shows as a conflict copy, dropped when that op is handled.)"""
    ns = repo.ns
    out = Changed()

    def run(t: LmdbTxn) -> Changed:
        paths: dict[NodeId, bytes | None] = {}
        for op in ops:
            if len(out.nodes) >= max_paths:
                break
            placed = local and op.type == OpType.MOVE and op.parent is not None
            if placed:
                assert op.parent is not None
                parent_path = _path_of(repo, t, op.parent, paths)
                path = None if parent_path is None else _join(parent_path, op.name)
            else:
                path = _path_of(repo, t, op.node, paths)
            if path is not None:
                out.add(path)
                if op.type == OpType.CONTENT or (op.has_content and not placed) or op.parents:
                    node = ns.get(t, op.node)
                    parent, name = _split(path)
                    keys = list(op.parents) + [h.key for h in (node.heads[:-1] if node else [])]
                    out.names.update((parent, conflict_name(name, k)) for k in keys)
            if op.type == OpType.MOVE:
                raw = t.get("ops", op.key)
                undo = entry_undo(raw) if raw is not None else b""
                if undo[:1] == b"\x01":
                    old_parent = _path_of(repo, t, NodeId(undo[1:17]), paths)
                    if old_parent is not None:
                        out.add(_join(old_parent, undo[41:]))
        return out
    return repo.env.read(run)


def top_level_paths(repo: Repo, limit: int = 10_000) -> Changed:
    """The root and the names in it (after a snapshot replaced the whole tree)."""
    out = Changed(nodes={b"/"})

    def run(t: LmdbTxn) -> Changed:
        for name, _, _ in repo.ns.children(t, ROOT):
            if len(out.names) >= limit:
                break
            out.names.add((b"/", name))
        return out
    return repo.env.read(run)


def _path_of(repo: Repo, txn: LmdbTxn, nid: NodeId,
             memo: dict[NodeId, bytes | None] | None = None) -> bytes | None:
    """The node's path in the users' view, or None when it is not in the tree. memo: paths
    found before in the same transaction (of the node and of every directory above it), so
    that the ops of one directory cost one walk up the tree, not one each."""
    ns = repo.ns
    memo = {} if memo is None else memo
    names: list[bytes] = []
    seen: list[NodeId] = []
    node = ns.get(txn, nid)
    path: bytes | None = None
    for _ in range(4096):
        if node is None or node.id == TRASH:
            break
        if node.id in memo:
            path = memo[node.id]
            break
        if node.id == ROOT:
            path = b"/"
            break
        parent, name = node.parent, node.name
        if parent == TRASH:               # a deleted file revived by an edit (edit beats delete)
            raw = txn.get("revived", node.id.raw)
            if raw is None:
                break
            parent, name = NodeId(bytes(raw[:16])), bytes(raw[16:])
        if parent is None:
            break
        if node.kind != Kind.UNKNOWN and ns.lookup(txn, parent, name) != node.id:
            name = conflict_name(name, node.move_key)   # lost the name to a concurrent entry
        seen.append(node.id)
        names.append(name)
        node = ns.get(txn, parent)
    for i in range(len(seen) - 1, -1, -1):
        path = None if path is None else _join(path, names[i])
        memo[seen[i]] = path
    return path


def _split(path: bytes) -> tuple[bytes, bytes]:
    parent, _, name = path.rstrip(b"/").rpartition(b"/")
    return parent or b"/", name


def _join(parent: bytes, name: bytes) -> bytes:
    return parent.rstrip(b"/") + b"/" + name


class LocalOpPeer:
    """OpPeer over another Repo in this process (tests and simulations)."""

    def __init__(self, repo: Repo, sync: NamespaceSync | None = None) -> None:
        self.repo = repo
        self.sync = sync

    def push_ops(self, ops: list[Op]) -> int:
        return self.sync.receive(ops) if self.sync else self.repo.apply_ops(ops)

    def pull_ops(self, vv: dict[bytes, int]) -> list[Op]:
        return self.repo.ops_since(vv)

    def snapshot(self) -> Iterator[tuple[str, bytes, bytes]]:
        return self.repo.export_snapshot()
