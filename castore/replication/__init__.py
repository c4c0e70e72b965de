"""Replication, read-through fetch, repair and rebalance: keeping every chunk on R peers.

Owns the policies only. It sees peers through PeerStore (a BlobStore-shaped interface that
RemoteStore implements over gRPC and tests implement in memory) and the cluster through a
ClusterView snapshot (who is live, where a chunk belongs). Must not import grpc,
castore._proto or castore.rpc.

- New local chunks are pushed to their write targets by background senders, `push_streams`
  per peer so one stream travels while the receiver commits another's batch: Has first, then
  the stored (compressed) bytes in streams of at most `window_bytes` each. Chunks still being
  pushed are left out of repair (listings and pulls), so a pass never copies them twice.
- wait_durable() returns once W peers hold every chunk, or reports indeterminate on timeout.
- fetch() gets missing chunks from the preference list (several holders in parallel).
  Received chunks are committed in batches of `commit_bytes`, one batch behind the stream, so
  receiving and the durable commit overlap; at most two batches per stream are held.
- reconcile(): for every placement group whose primary (first live peer of its preference
  list) is this peer, list what every member holds, have targets pull what they lack (fewest
  copies first, spread over the holders), then drop copies outside the targets once every
  target holds one (make-before-break).
- Bytes that do not hash to their id are never stored and count against the sending peer; a
  peer past `quarantine_after` rejections is ignored.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

from castore.errors import CastoreError, ChunkNotFoundError
from castore.ids import ChunkId
from castore.store import StoredChunk

log = logging.getLogger(__name__)

FETCH_PAUSE = 0.25      # seconds between a fetch's rounds when a holder did not answer
FETCH_BASE = 10.0       # seconds a holder has to send what a fetch asks of it, plus
FETCH_PER_CHUNK = 2.0   # this per chunk (4 MiB at most): a stalled holder is given up on
HEDGE_AFTER = 1.0       # seconds a holder has to start sending before the next is asked too

Batch = list[tuple[ChunkId, StoredChunk]]


class LocalStore(Protocol):
    """This peer's holdings (chunks and manifests) as replication needs them."""

    def has_many(self, ids: list[ChunkId]) -> list[bool]: ...
    def get_stored(self, cid: ChunkId) -> StoredChunk: ...
    def put_stored_many(self, items: Batch) -> tuple[list[ChunkId], list[ChunkId]]: ...
    def delete_many(self, ids: list[ChunkId]) -> None: ...
    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]: ...


class PeerStore(Protocol):
    """Another peer as a store. Every method raises PeerUnavailableError when the peer cannot
    be reached in time; put_stored_many returns (stored, rejected): rejected ids did not hash
    to their bytes and were not stored."""

    def has_many(self, ids: list[ChunkId]) -> list[bool]: ...
    def put_stored_many(self, items: Batch) -> tuple[list[ChunkId], list[ChunkId]]: ...
    def get_stored_many(self, ids: list[ChunkId], timeout: float | None = None
                        ) -> Iterator[tuple[ChunkId, StoredChunk]]: ...
    def list_ids(self, pg_bits: int, pgs: list[int]) -> Iterator[ChunkId]: ...
    def pull(self, items: list[tuple[ChunkId, list[str]]]) -> tuple[list[ChunkId],
                                                                     list[ChunkId]]: ...
    def drop(self, ids: list[ChunkId]) -> int: ...


def pg_of(cid: ChunkId, bits: int) -> int:
    """Placement group of a chunk: the top `bits` bits of its id."""
    return int.from_bytes(cid.digest[:8], "big") >> (64 - bits)


@dataclass(frozen=True)
class ClusterView:
    """A consistent snapshot of what replication decides from.

    targets(pg) are the peers (among placed members: alive, suspect or dead-but-not-out) that
    should hold a chunk of group pg; preference(pg) is every placed peer in order."""

    me: str
    redundancy: int
    live: frozenset[str]
    placed: tuple[str, ...]
    pg_bits: int
    preference: Callable[[int], list[str]]
    targets: Callable[[int], list[str]]
    suspect: frozenset[str] = frozenset()    # live, but a probe went unanswered

    @property
    def r_eff(self) -> int:
        return max(1, min(self.redundancy, len(self.live)))

    def write_targets(self, pg: int) -> list[str]:
        """Where a new chunk goes now: its live targets, topped up from the preference list
        while a target is down or suspect (the stand-in keeps the copy until repair moves
        it). A suspect target still gets its copy, last: a write's acknowledgement does not
        wait on a peer that stopped answering probes."""
        live = [p for p in self.targets(pg) if p in self.live]
        chosen = [p for p in live if p not in self.suspect]
        for p in self.preference(pg):
            if len(chosen) >= self.r_eff:
                break
            if p in self.live and p not in self.suspect and p not in chosen:
                chosen.append(p)
        return chosen[:self.r_eff] + [p for p in live if p in self.suspect]

    def primary(self, pg: int) -> str | None:
        return next((p for p in self.preference(pg) if p in self.live), None)


@dataclass
class RepairStats:
    passes: int = 0
    under_replicated: int = 0
    pending: int = 0
    transfers: int = 0
    dropped: int = 0
    by_copies: dict[int, int] = field(default_factory=dict)
    last_seconds: float = 0.0


class Replicator:
    """Replication policies of one peer. Thread-safe; start() runs the background senders."""

    def __init__(self, local: LocalStore, peer_store: Callable[[str], PeerStore],
                 view: Callable[[], ClusterView], *, window_bytes: int = 16 << 20,
                 push_streams: int = 2, commit_bytes: int = 16 << 20,
                 batch_items: int = 64, max_transfers: int = 2, quarantine_after: int = 3,
                 ack_copies: int = 2, push_grace: float = 5.0,
                 fetch_patience: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_bytes: Callable[[str, str, int], None] | None = None) -> None:
        self.local = local
        self.peer_store = peer_store
        self.view = view
        self.window_bytes = window_bytes
        self.push_streams = max(1, push_streams)
        self.commit_bytes = commit_bytes
        self.batch_items = batch_items
        self.push_grace = push_grace
        self.ack_copies = ack_copies
        self.quarantine_after = quarantine_after
        self.fetch_patience = fetch_patience
        self._clock = clock
        self._on_bytes = on_bytes or (lambda peer, direction, n: None)
        self._copies: dict[ChunkId, set[str]] = {}
        self._cond = threading.Condition()
        # per peer, (priority, sequence, id): the copies an acknowledgement waits for go
        # first, extra copies (a writer outside the targets sends two) after them
        self._queues: dict[str, queue.PriorityQueue[tuple[int, int, ChunkId | None]]] = {}
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._retry: list[tuple[float, ChunkId]] = []
        self._inbound = threading.Semaphore(max_transfers)
        self._max_transfers = max_transfers
        # fetches in flight; a holder given up on by a hedge keeps its thread until its call
        # ends
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="castore-fetch")
        self._commits = ThreadPoolExecutor(4, thread_name_prefix="castore-commit")
        self._pushing: dict[ChunkId, int] = {}     # pushes queued or on the wire, per chunk
        self.rejected: dict[str, int] = defaultdict(int)
        self.stats = RepairStats()
        self._repair_mutex = threading.Lock()
        self._queued = 0
        self._stopping = False

    # -- bookkeeping ----------------------------------------------------------------------
    def quarantined(self, peer: str) -> bool:
        return self.rejected.get(peer, 0) >= self.quarantine_after

    def count_rejects(self, peer: str, n: int) -> None:
        if n <= 0:
            return
        self.rejected[peer] += n
        log.warning("peer %s sent %d chunk(s) whose bytes do not match their ids (%d so far)%s",
                    peer[:10], n, self.rejected[peer],
                    "; its data is ignored from now on" if self.quarantined(peer) else "")

    def _confirm(self, peer: str, ids: Iterable[ChunkId]) -> None:
        with self._cond:
            for cid in ids:
                self._copies.setdefault(cid, set()).add(peer)
            self._cond.notify_all()

    @property
    def queued(self) -> int:
        return self._queued

    # -- pushing new chunks ---------------------------------------------------------------
    def submit(self, ids: Iterable[ChunkId]) -> None:
        """Queue newly committed local chunks for their targets. Returns at once."""
        view = self.view()
        ids = list(ids)
        self._confirm(view.me, ids)
        for cid in ids:
            remote = [p for p in view.write_targets(pg_of(cid, view.pg_bits)) if p != view.me]
            for i, peer in enumerate(remote):
                with self._cond:
                    self._queued += 1
                    self._pushing[cid] = self._pushing.get(cid, 0) + 1
                prio = 0 if i < self.ack_copies - 1 else 1
                self._queue_for(peer).put((prio, next(self._seq), cid))

    def pushing(self, cid: ChunkId) -> bool:
        """True while a push of cid is queued or on the wire: repair leaves it to the push."""
        return cid in self._pushing

    def _pushed(self, ids: list[ChunkId]) -> None:
        with self._cond:
            self._queued -= len(ids)
            for cid in ids:
                n = self._pushing.get(cid, 0) - 1
                if n > 0:
                    self._pushing[cid] = n
                else:
                    self._pushing.pop(cid, None)
            self._cond.notify_all()

    def wait_pushed(self, timeout: float) -> bool:
        """Wait until the pushes queued now have finished (sent, or deferred to a retry).
        Returns False at the timeout."""
        deadline = self._clock() + timeout
        with self._cond:
            pending = set(self._pushing)
            while pending:
                pending = {c for c in pending if c in self._pushing}
                left = deadline - self._clock()
                if not pending:
                    break
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def _queue_for(self, peer: str) -> queue.PriorityQueue[tuple[int, int, ChunkId | None]]:
        with self._cond:
            q = self._queues.get(peer)
            if q is None:
                q = self._queues[peer] = queue.PriorityQueue()
                t = threading.Thread(target=self._sender, args=(peer, q), daemon=True,
                                     name=f"castore-push-{peer[:8]}")
                self._threads.append(t)
                t.start()
            return q

    def _sender(self, peer: str, q: queue.PriorityQueue[tuple[int, int, ChunkId | None]]
                ) -> None:
        """Per peer: ask which queued chunks it lacks, read them and hand windows to
        push_streams streamers, so Has, reading, the wire and the receiver's commit overlap.
        At most push_streams + 2 windows are held per peer."""
        windows: queue.Queue[tuple[PeerStore, Batch, int] | None] = queue.Queue(maxsize=1)
        streamers = [threading.Thread(target=self._streamer, args=(peer, windows), daemon=True,
                                      name=f"castore-push-{peer[:8]}-{i}")
                     for i in range(self.push_streams)]
        for t in streamers:
            t.start()
        try:
            while True:
                first = q.get()[2]
                if first is None:
                    return
                ids = [first]
                while len(ids) < self.batch_items * 4:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        break
                    if item[2] is None:
                        q.put(item)
                        break
                    ids.append(item[2])
                self._read_windows(peer, ids, windows)
        finally:
            for _ in streamers:
                windows.put(None)

    def _read_windows(self, peer: str, ids: list[ChunkId],
                      windows: queue.Queue[tuple[PeerStore, Batch, int] | None]) -> None:
        queued = list(ids)           # still counted as pushing; released as windows finish
        try:
            remote = self.peer_store(peer)
            have = remote.has_many(ids)
            present = [c for c, h in zip(ids, have) if h]
            self._confirm(peer, present)
            missing = [c for c, h in zip(ids, have) if not h]
            self._pushed(present)
            queued = missing
            batch: Batch = []
            size = 0
            for cid in missing:
                try:
                    stored = self.local.get_stored(cid)
                except ChunkNotFoundError:
                    self._pushed([cid])          # dropped meanwhile: someone else has it
                    queued.remove(cid)
                    continue
                batch.append((cid, stored))
                size += len(stored.data)
                if size >= self.window_bytes or len(batch) >= self.batch_items:
                    windows.put((remote, batch, size))
                    queued = queued[len(batch):]
                    batch, size = [], 0
            if batch:
                windows.put((remote, batch, size))
                queued = []
        except Exception as exc:  # any failure: retry later, never lose the sender
            self._defer(peer, queued, exc)
            self._pushed(queued)

    def _streamer(self, peer: str,
                  windows: queue.Queue[tuple[PeerStore, Batch, int] | None]) -> None:
        while True:
            item = windows.get()
            if item is None:
                return
            remote, batch, size = item
            ids = [c for c, _ in batch]
            try:
                self._send(peer, remote, batch, size)
            except Exception as exc:  # any failure: retry later, never lose the streamer
                self._defer(peer, ids, exc)
            finally:
                self._pushed(ids)

    def _defer(self, peer: str, ids: list[ChunkId], exc: Exception) -> None:
        if isinstance(exc, CastoreError):
            log.info("replication to %s deferred: %s", peer[:10], exc)
        else:
            log.error("replication to %s failed; retrying", peer[:10], exc_info=exc)
        due = self._clock() + 1.0
        with self._cond:
            self._retry.extend((due, c) for c in ids)

    def _send(self, peer: str, remote: PeerStore, batch: Batch, size: int) -> int:
        stored, rejected = remote.put_stored_many(batch)
        self._confirm(peer, stored)
        self._on_bytes(peer, "out", size)
        if rejected:
            log.error("peer %s rejected %d chunk(s) from this peer as corrupt", peer[:10],
                      len(rejected))
        return size

    def retry_due(self) -> None:
        """Re-queue pushes that failed at least a second ago (called by the daemon loop)."""
        now = self._clock()
        with self._cond:
            due = [c for t, c in self._retry if t <= now]
            self._retry = [(t, c) for t, c in self._retry if t > now]
        if due:
            self.submit(due)

    # -- durability -----------------------------------------------------------------------
    def copies(self, cid: ChunkId) -> int:
        with self._cond:
            return len({p for p in self._copies.get(cid, ()) if not self.quarantined(p)})

    def wait_durable(self, ids: list[ChunkId], w: int, timeout: float) -> tuple[bool, int]:
        """Block until every id is known durable on w peers (this one included). Returns
        (True, min copies) then, or (False, min copies) at the timeout: indeterminate, the
        copies may still land."""
        deadline = self._clock() + timeout
        next_probe = self._clock() + 2.0
        while True:
            with self._cond:
                low = min((self.copies(c) for c in ids), default=w)
                if low >= w:
                    return True, low
                left = deadline - self._clock()
                if left <= 0:
                    return False, low
                self._cond.wait(min(left, 0.5))
            if self._clock() >= next_probe:
                # copies may have landed by a path this peer did not drive (a repair pull)
                self._probe_copies([c for c in ids if self.copies(c) < w])
                next_probe = self._clock() + 2.0

    def _probe_copies(self, ids: list[ChunkId]) -> None:
        view = self.view()
        by_peer: dict[str, list[ChunkId]] = defaultdict(list)
        for cid in ids:
            for p in view.write_targets(pg_of(cid, view.pg_bits)):
                if p != view.me:
                    by_peer[p].append(cid)
        for peer, cs in by_peer.items():
            try:
                have = self.peer_store(peer).has_many(cs)
            except CastoreError:
                continue
            self._confirm(peer, [c for c, h in zip(cs, have) if h])

    # -- reading through ------------------------------------------------------------------
    def fetch(self, ids: list[ChunkId]) -> None:
        """Make every id local (a cache copy) from the peers of its preference list, several
        holders in parallel: peers membership holds alive first, then suspects, then placed
        peers it holds down (a peer back from a partition is reached before membership has
        heard it refute). A holder that has sent nothing after HEDGE_AFTER seconds is not
        waited for: the next holder is asked too, and what either sends is kept. A holder
        has FETCH_BASE + FETCH_PER_CHUNK per chunk to send them. Peers that did not answer
        are asked again every FETCH_PAUSE seconds for `fetch_patience` seconds (a channel
        still backing off after a heal fails at once).
        Raises ChunkNotFoundError naming an id that every peer asked said it lacks, or that
        no peer gave in that time."""
        want = [c for c, h in zip(ids, self.local.has_many(ids)) if not h]
        deadline = self._clock() + self.fetch_patience
        rounds = 0
        while want:
            missing, silent = self._fetch_round(want)
            if not missing:
                if rounds:
                    log.info("fetch: got every chunk after %d more round(s)", rounds)
                return
            unsure = [c for c in missing if c in silent]
            if unsure and not rounds:
                log.info("fetch: a holder of %d chunk(s) did not answer; asking again for up "
                         "to %g s", len(unsure), self.fetch_patience)
            rounds += 1
            if not unsure or self._clock() >= deadline or self._stopping:
                c = (unsure or missing)[0]
                why = ("a peer that may hold it did not answer for "
                       f"{self.fetch_patience:g} s" if unsure else
                       "every peer of its preference list said it lacks it")
                raise ChunkNotFoundError(f"no peer gave {c}: {why}")
            time.sleep(FETCH_PAUSE)
            # a holder left behind by a hedge may have sent its chunks meanwhile
            want = [c for c, h in zip(missing, self.local.has_many(missing)) if not h]

    def _fetch_round(self, want: list[ChunkId]) -> tuple[list[ChunkId], set[ChunkId]]:
        """Ask each id's holders in turn until one gives it. Returns the ids no one gave, and
        those of them that a peer asked failed to answer for."""
        view = self.view()
        tries: dict[ChunkId, list[str]] = {}
        for c in want:
            pref = [p for p in view.preference(pg_of(c, view.pg_bits))
                    if p != view.me and not self.quarantined(p)]
            tries[c] = sorted(pref, key=lambda p: 0 if p in view.live and p not in
                              view.suspect else 1 if p in view.live else 2)
        silent: set[ChunkId] = set()
        missing: list[ChunkId] = []
        while want:
            groups: dict[str, list[ChunkId]] = defaultdict(list)
            for c in want:
                if tries[c]:
                    groups[tries[c].pop(0)].append(c)
                else:
                    missing.append(c)
            started = {p: threading.Event() for p in groups}
            futures = {p: self._pool.submit(self._fetch_from, p, cs, started[p])
                       for p, cs in groups.items()}
            wait(futures.values(), timeout=HEDGE_AFTER)
            got: set[ChunkId] = set()
            for p, f in futures.items():
                if not f.done() and not started[p].is_set() and \
                        all(tries[c] for c in groups[p]):
                    # nothing yet from this holder, and each of its chunks has another:
                    # ask those now (this call goes on, and what it sends is kept)
                    log.debug("fetch: %s has sent nothing for %g s; asking the next holders",
                              p[:10], HEDGE_AFTER)
                    silent.update(groups[p])
                    continue
                stored, err = f.result()
                got.update(stored)
                if err is not None:
                    log.debug("fetch from %s failed: %s", p[:10], err)
                    silent.update(groups[p])
            want = [c for cs in groups.values() for c in cs if c not in got]
        return missing, silent

    def _fetch_from(self, peer: str, ids: list[ChunkId], started: threading.Event | None = None
                    ) -> tuple[list[ChunkId], CastoreError | None]:
        """What `peer` gave of ids (verified and stored here), and why it did not answer
        (None when it did). Sets `started` once the peer answers at all."""
        stored: list[ChunkId] = []

        def items() -> Iterator[tuple[ChunkId, StoredChunk]]:
            for item in self.peer_store(peer).get_stored_many(
                    ids, timeout=FETCH_BASE + FETCH_PER_CHUNK * len(ids)):
                if started is not None:
                    started.set()
                yield item
        try:
            self.accept_stream(peer, items(), stored)
        except CastoreError as exc:
            return stored, exc
        finally:
            if started is not None:
                started.set()
        return stored, None

    def accept_stream(self, sender: str, items: Iterable[tuple[ChunkId, StoredChunk]],
                      stored: list[ChunkId]) -> list[ChunkId]:
        """Store chunks as they arrive from a peer, verified, in durable commits of about
        commit_bytes; a batch commits while the next one arrives, so at most two are held.
        Appends what is durable here (stored or already held) to `stored` as each commit
        returns and returns every id received. An error of `items` propagates once the
        commit under way has finished; the batch still arriving is dropped."""
        received: list[ChunkId] = []
        pending: Future[list[ChunkId]] | None = None
        batch: Batch = []
        size = 0
        try:
            for cid, chunk in items:
                batch.append((cid, chunk))
                received.append(cid)
                size += len(chunk.data)
                if size >= self.commit_bytes:
                    if pending is not None:
                        stored.extend(pending.result())
                    pending = self._commits.submit(self.accept, sender, batch)
                    batch, size = [], 0
        finally:
            if pending is not None:
                stored.extend(pending.result())
        stored.extend(self.accept(sender, batch))
        return received

    def accept(self, sender: str, batch: Batch) -> list[ChunkId]:
        """Store chunks received from a peer, verified; mismatches count against it."""
        if not batch or self.quarantined(sender):
            return []
        stored, rejected = self.local.put_stored_many(batch)
        self.count_rejects(sender, len(rejected))
        self._on_bytes(sender, "in", sum(len(s.data) for c, s in batch))
        return stored

    # -- serving peers --------------------------------------------------------------------
    def handle_put(self, sender: str, batch: Iterable[tuple[ChunkId, StoredChunk]]
                   ) -> tuple[list[ChunkId], list[ChunkId]]:
        """Store a peer's push (see accept_stream): (durable here, not stored)."""
        stored: list[ChunkId] = []
        received = self.accept_stream(sender, batch, stored)
        ok = set(stored)
        return stored, [c for c in received if c not in ok]

    def handle_pull(self, items: list[tuple[ChunkId, list[str]]]
                    ) -> tuple[list[ChunkId], list[ChunkId]]:
        """Fetch items from the given sources (a repair transfer), spread over the sources
        and from all of them at once; a chunk whose source fails is asked of its next one.
        At most max_transfers run on this peer at once; the rest wait."""
        with self._inbound:
            ids = [c for c, _ in items]
            have = dict(zip(ids, self.local.has_many(ids)))
            todo = [(c, s) for c, s in items if not have[c]]
            done = [c for c in ids if have[c]]
            while todo:
                by_src: dict[str, list[ChunkId]] = defaultdict(list)
                left = []
                for c, srcs in todo:
                    srcs = [s for s in srcs if not self.quarantined(s)]
                    if srcs:
                        # the least loaded source so far; the preference order breaks ties
                        src = min(srcs, key=lambda s: len(by_src[s]))
                        by_src[src].append(c)
                        left.append((c, [s for s in srcs if s != src]))
                futures = [self._pool.submit(self._fetch_from, src, cs)
                           for src, cs in by_src.items()]
                got: set[ChunkId] = set()
                for src, f in zip(by_src, futures):
                    stored, err = f.result()
                    got.update(stored)
                    if err is not None:
                        log.info("pull from %s failed: %s", src[:10], err)
                done.extend(got)
                todo = [(c, s) for c, s in left if c not in got and s]
            failed = [c for c in ids if c not in set(done)]
            return done, failed

    def handle_drop(self, ids: list[ChunkId]) -> int:
        """Delete local copies (a referenced manifest stays), in one transaction; returns how
        many went."""
        self.local.delete_many(ids)
        return sum(1 for h in self.local.has_many(ids) if not h)

    # -- repair and rebalance -------------------------------------------------------------
    def reconcile(self) -> RepairStats:
        """One repair pass over the groups this peer is primary of; see the module doc."""
        with self._repair_mutex:
            started = self._clock()
            # this peer's own new chunks are placed by their pushes, not by pulls: give the
            # pushes under way a moment, and leave out whatever is still being pushed
            self.wait_pushed(self.push_grace)
            view = self.view()
            mine = sorted({pg for pg in range(1 << view.pg_bits) if view.primary(pg) == view.me})
            holders: dict[ChunkId, set[str]] = defaultdict(set)
            wanted = set(mine)
            for cid in self.local.ids():
                if pg_of(cid, view.pg_bits) in wanted:
                    holders[cid].add(view.me)
            for peer in sorted(view.live - {view.me}):
                if self.quarantined(peer) or not mine:
                    continue
                try:
                    for cid in self.peer_store(peer).list_ids(view.pg_bits, mine):
                        if pg_of(cid, view.pg_bits) in wanted:
                            holders[cid].add(peer)
                except CastoreError as exc:
                    log.info("repair: cannot list %s: %s", peer[:10], exc)
                    return self.stats
            for cid in [c for c in holders if self.pushing(c)]:
                del holders[cid]
            pulls: dict[str, list[tuple[int, ChunkId, list[str]]]] = defaultdict(list)
            by_copies: dict[int, int] = defaultdict(int)
            under = 0
            for cid, hs in holders.items():
                targets = view.targets(pg_of(cid, view.pg_bits))
                live_targets = [t for t in targets if t in view.live]
                placed_copies = len([t for t in targets if t in hs])
                by_copies[len(hs)] += 1
                if placed_copies < view.r_eff:
                    under += 1
                sources = [p for p in view.preference(pg_of(cid, view.pg_bits)) if p in hs]
                sources += sorted(hs - set(sources))
                for t in live_targets:
                    if t not in hs:
                        pulls[t].append((len(hs), cid, sources))
            self.stats.under_replicated = under
            self.stats.by_copies = dict(by_copies)
            self.stats.pending = sum(len(v) for v in pulls.values())
            self._run_pulls(pulls, holders)
            self._drop_extras(view, holders)
            log.debug("repair pass: %d groups, %d ids, %d under-replicated, %d pulls, "
                      "%d dropped so far", len(mine), len(holders), under,
                      sum(len(v) for v in pulls.values()), self.stats.dropped)
            self.stats.passes += 1
            self.stats.pending = 0
            self.stats.last_seconds = self._clock() - started
            return self.stats

    def _run_pulls(self, pulls: dict[str, list[tuple[int, ChunkId, list[str]]]],
                   holders: dict[ChunkId, set[str]]) -> None:
        def run(target: str, parts: list[list[tuple[int, ChunkId, list[str]]]]) -> None:
            for part in parts:
                try:
                    if target == self.view().me:
                        done, _ = self.handle_pull([(c, s) for _, c, s in part])
                    else:
                        done, _ = self.peer_store(target).pull([(c, s) for _, c, s in part])
                except CastoreError as exc:
                    log.info("repair: %s could not pull: %s", target[:10], exc)
                    return
                with self._cond:
                    for c in done:
                        holders[c].add(target)
                    self.stats.transfers += len(done)
                    self.stats.pending -= len(part)
                self._confirm(target, done)
        # up to max_transfers pulls per target at once (the target admits as many), so one
        # transfer's commit overlaps another's stream; batches interleave over the lanes
        lanes: list[tuple[str, list[list[tuple[int, ChunkId, list[str]]]]]] = []
        for target, work in pulls.items():
            work.sort(key=lambda w: w[0])                 # fewest copies first
            parts = [work[i:i + self.batch_items] for i in range(0, len(work), self.batch_items)]
            n = max(1, min(self._max_transfers, len(parts)))
            lanes += [(target, parts[k::n]) for k in range(n)]
        if not lanes:
            return
        with ThreadPoolExecutor(max(1, min(len(lanes), 2 * self._max_transfers)),
                                thread_name_prefix="castore-repair") as pool:
            for f in [pool.submit(run, t, parts) for t, parts in lanes]:
                f.result()

    def _drop_extras(self, view: ClusterView, holders: dict[ChunkId, set[str]]) -> None:
        drops: dict[str, list[ChunkId]] = defaultdict(list)
        for cid, hs in holders.items():
            targets = view.targets(pg_of(cid, view.pg_bits))
            if not all(t in hs and t in view.live for t in targets):
                continue                       # make-before-break: every target holds it
            for h in hs - set(targets):
                drops[h].append(cid)
        for peer, ids in drops.items():
            try:
                n = self.handle_drop(ids) if peer == view.me else self.peer_store(peer).drop(ids)
                self.stats.dropped += n
                with self._cond:
                    for c in ids:
                        self._copies.get(c, set()).discard(peer)
            except CastoreError as exc:
                log.info("repair: %s could not drop copies: %s", peer[:10], exc)

    def close(self) -> None:
        with self._cond:
            for q in self._queues.values():
                q.put((-1, -1, None))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._commits.shutdown(wait=False, cancel_futures=True)
