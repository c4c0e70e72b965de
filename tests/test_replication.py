"""Replicator and Membership without a network: in-process peers over MemoryStores, an
injected transport and clock. Seeds are printed on failure through the test ids."""
from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest

from castore import codec
from castore.errors import ChunkNotFoundError, IntegrityError, PeerUnavailableError
from castore.ids import ChunkId
from castore.membership import Member, Membership, State
from castore.ids import PeerId
from castore.placement import PeerInfo, holders, preference_list
from castore.replication import ClusterView, Replicator, pg_of
from castore.store import MemoryStore, StoredChunk

BITS = 6


class MemLocal:
    """LocalStore over a MemoryStore."""

    def __init__(self) -> None:
        self.store = MemoryStore()

    def has_many(self, ids: list[ChunkId]) -> list[bool]:
        return [self.store.has(c) for c in ids]

    def get_stored(self, cid: ChunkId) -> StoredChunk:
        return self.store.get_stored(cid)

    def put_stored_many(self, items: list[tuple[ChunkId, StoredChunk]]
                        ) -> tuple[list[ChunkId], list[ChunkId]]:
        ok, bad = [], []
        for cid, s in items:
            try:
                self.store.put_stored(cid, s)
                ok.append(cid)
            except IntegrityError:
                bad.append(cid)
        return ok, bad

    def delete_many(self, ids: list[ChunkId]) -> None:
        for cid in ids:
            self.store.delete(cid)

    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]:
        return self.store.ids(after)


class Sim:
    """n peers; peer_store(p) talks to peer p's Replicator in-process; `down` peers fail."""

    def __init__(self, n: int, r: int, seed: int) -> None:
        rng = random.Random(seed)
        self.ids = [rng.randbytes(32).hex() for _ in range(n)]
        self.down: set[str] = set()
        self.out: set[str] = set()
        self.evil: set[str] = set()
        self.thought_down: set[str] = set()     # the view says down; the peer still answers
        self.suspect: set[str] = set()          # the view says suspect
        self.slow: dict[str, float] = {}        # seconds a peer waits before it sends
        self.asked: list[str] = []              # peers whose store was asked for, in order
        self.fail_next: dict[str, int] = {}     # calls a peer fails before it answers again
        self.r = r
        self.locals = {p: MemLocal() for p in self.ids}
        self.reps = {p: Replicator(self.locals[p], lambda q, me=p: self.remote(me, q),
                                   lambda me=p: self.view(me), batch_items=8)
                     for p in self.ids}

    def add_peer(self, seed: int) -> str:
        p = random.Random(seed).randbytes(32).hex()
        self.ids.append(p)
        self.locals[p] = MemLocal()
        self.reps[p] = Replicator(self.locals[p], lambda q, me=p: self.remote(me, q),
                                  lambda me=p: self.view(me), batch_items=8)
        return p

    def view(self, me: str) -> ClusterView:
        placed = [p for p in self.ids if p not in self.out]
        infos = [PeerInfo(PeerId.from_hex(p), 1.0, p[:4]) for p in placed]
        live = frozenset(p for p in placed
                         if p not in self.down and p not in self.thought_down)
        return ClusterView(me, self.r, live, tuple(placed), BITS,
                           lambda pg: [x.hex for x in preference_list(pg, infos, bits=BITS)],
                           lambda pg: [x.hex for x in holders(pg, infos, self.r, bits=BITS)],
                           frozenset(self.suspect & live))

    def remote(self, me: str, peer: str) -> Remote:
        self.asked.append(peer)
        if peer in self.down:
            raise PeerUnavailableError(f"{peer[:6]} is down")
        if self.fail_next.get(peer, 0) > 0:
            self.fail_next[peer] -= 1
            raise PeerUnavailableError(f"{peer[:6]} is backing off")
        return Remote(self, me, peer)

    def copies(self, cid: ChunkId) -> int:
        return sum(self.locals[p].store.has(cid) for p in self.ids if p not in self.down)


class Remote:
    def __init__(self, sim: Sim, me: str, peer: str) -> None:
        self.sim, self.me, self.peer = sim, me, peer
        self.rep = sim.reps[peer]
        self.local = sim.locals[peer]

    def has_many(self, ids: list[ChunkId]) -> list[bool]:
        return self.local.has_many(ids)

    def put_stored_many(self, items: list[tuple[ChunkId, StoredChunk]]
                        ) -> tuple[list[ChunkId], list[ChunkId]]:
        time.sleep(self.sim.slow.get(self.peer, 0.0))
        return self.rep.handle_put(self.me, items)

    def get_stored_many(self, ids: list[ChunkId], timeout: float | None = None
                        ) -> Iterator[tuple[ChunkId, StoredChunk]]:
        time.sleep(self.sim.slow.get(self.peer, 0.0))
        for c in ids:
            if self.local.store.has(c):
                s = self.local.get_stored(c)
                if self.peer in self.sim.evil:
                    s = StoredChunk(s.codec, s.raw_len, bytes([s.data[0] ^ 1]) + s.data[1:])
                yield c, s

    def list_ids(self, pg_bits: int, pgs: list[int]) -> Iterator[ChunkId]:
        want = set(pgs)
        return (c for c in self.local.ids() if pg_of(c, pg_bits) in want)

    def pull(self, items: list[tuple[ChunkId, list[str]]]
             ) -> tuple[list[ChunkId], list[ChunkId]]:
        return self.rep.handle_pull(items)

    def drop(self, ids: list[ChunkId]) -> int:
        return self.rep.handle_drop(ids)


def write(sim: Sim, writer: str, n: int, seed: int) -> list[ChunkId]:
    rng = random.Random(seed)
    ids = []
    for _ in range(n):
        data = rng.randbytes(rng.randint(100, 5000))
        cid = ChunkId.of(data)
        tag, stored = codec.encode(data, 1)
        sim.locals[writer].store.put_stored(cid, StoredChunk(tag, len(data), bytes(stored)))
        ids.append(cid)
    sim.reps[writer].submit(ids)
    return ids


def reconcile_all(sim: Sim, rounds: int = 2) -> None:
    for _ in range(rounds):
        for p in sim.ids:
            if p not in sim.down:
                sim.reps[p].reconcile()


def on_targets(sim: Sim, cid: ChunkId) -> bool:
    v = sim.view(sim.ids[0])
    return all(sim.locals[t].store.has(cid) for t in v.targets(pg_of(cid, BITS)))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_writes_reach_w_copies_and_repair_restores_r(seed: int) -> None:
    sim = Sim(4, 3, seed)
    ids = write(sim, sim.ids[0], 60, seed)
    ok, low = sim.reps[sim.ids[0]].wait_durable(ids, 2, timeout=10)
    assert ok and low >= 2
    reconcile_all(sim)
    assert all(on_targets(sim, c) for c in ids)
    assert all(sim.copies(c) == 3 for c in ids), "extra copies outside the targets remain"
    victim = sim.ids[1]
    sim.down.add(victim)
    reconcile_all(sim)                       # dead but not out: nothing moves
    assert all(sim.copies(c) >= 2 for c in ids)
    sim.out.add(victim)
    reconcile_all(sim)
    assert all(sim.copies(c) == 3 for c in ids)
    assert all(on_targets(sim, c) for c in ids)


def test_wait_durable_times_out_as_indeterminate() -> None:
    sim = Sim(3, 3, 7)
    for p in sim.ids[1:]:
        sim.down.add(p)
    ids = write(sim, sim.ids[0], 5, 7)
    sim.down.clear()          # the view now says they are live, but pushes already failed
    ok, low = sim.reps[sim.ids[0]].wait_durable(ids, 2, timeout=0.3)
    assert not ok and low == 1


def test_join_moves_only_the_newcomers_share() -> None:
    sim = Sim(3, 2, 11)
    ids = write(sim, sim.ids[0], 200, 11)
    reconcile_all(sim)
    before = {p: set(sim.locals[p].store.ids()) for p in sim.ids}
    new = sim.add_peer(99)
    reconcile_all(sim)
    got = set(sim.locals[new].store.ids())
    for p, held in before.items():
        assert set(sim.locals[p].store.ids()) <= held, "an old peer received data on a join"
    v = sim.view(new)
    expected = {c for c in ids if new in v.targets(pg_of(c, BITS))}
    assert got == expected
    assert all(sim.copies(c) == 2 for c in ids)


def test_fetch_skips_a_peer_serving_wrong_bytes_and_counts_it() -> None:
    sim = Sim(4, 3, 5)
    ids = write(sim, sim.ids[0], 30, 5)
    reconcile_all(sim)
    reader = next(p for p in sim.ids if any(not sim.locals[p].store.has(c) for c in ids))
    evil = next(p for p in sim.ids if p != reader)
    sim.evil.add(evil)
    want = [c for c in ids if not sim.locals[reader].store.has(c)]
    sim.reps[reader].fetch(want)
    for c in want:
        assert sim.locals[reader].store.get(c)        # verified bytes
    rep = sim.reps[reader]
    if rep.rejected.get(evil, 0):
        assert rep.rejected[evil] >= 1


def test_fetch_of_unknown_chunk_is_not_found() -> None:
    sim = Sim(2, 2, 3)
    with pytest.raises(ChunkNotFoundError):
        sim.reps[sim.ids[0]].fetch([ChunkId.of(os.urandom(10))])


def held_by(sim: Sim, holders_: list[str], n: int) -> list[ChunkId]:
    """n chunks stored on those peers alone (not pushed anywhere)."""
    ids = []
    for i in range(n):
        data = os.urandom(1000 + i)
        tag, stored = codec.encode(data, 1)
        ids.append(ChunkId.of(data))
        for h in holders_:
            sim.locals[h].store.put_stored(ids[-1], StoredChunk(tag, len(data), bytes(stored)))
    return ids


def test_fetch_asks_a_peer_membership_holds_down_and_one_that_failed_again() -> None:
    sim = Sim(2, 2, 3)
    reader, holder = sim.ids
    ids = held_by(sim, [holder], 3)
    sim.thought_down.add(holder)             # back from a partition; not yet refuted
    sim.fail_next[holder] = 2                # and its channel still backing off
    sim.reps[reader].fetch(ids)
    assert all(sim.locals[reader].store.has(c) for c in ids)
    assert sim.fail_next[holder] == 0


def test_fetch_asks_a_suspect_holder_after_the_others() -> None:
    sim = Sim(3, 3, 3)
    reader, stalled, other = sim.ids
    ids = held_by(sim, [stalled, other], 40)
    sim.suspect.add(stalled)
    sim.asked.clear()
    sim.reps[reader].fetch(ids)
    assert all(sim.locals[reader].store.has(c) for c in ids)
    assert stalled not in sim.asked, "the suspect was asked while an alive holder had it all"


def test_fetch_asks_the_next_holder_when_the_first_sends_nothing() -> None:
    sim = Sim(3, 3, 3)
    reader, stalled, other = sim.ids
    ids = held_by(sim, [stalled, other], 40)
    sim.slow[stalled] = 4.0                  # connected, but sends nothing for 4 s
    start = time.monotonic()
    sim.reps[reader].fetch(ids)
    took = time.monotonic() - start
    assert all(sim.locals[reader].store.has(c) for c in ids)
    assert stalled in sim.asked              # first in line for some of them
    assert took < 3.0, took                  # HEDGE_AFTER (1 s), not the stall


def test_a_write_is_acknowledged_without_a_suspect_target() -> None:
    sim = Sim(3, 2, 9)
    writer, stalled, _ = sim.ids
    sim.suspect.add(stalled)
    sim.slow[stalled] = 3.0                  # takes pushes, but answers after 3 s
    ids = write(sim, writer, 40, 9)
    view = sim.view(writer)
    assert any(stalled in view.targets(pg_of(c, BITS)) for c in ids)
    for c in ids:                            # the suspect comes last, after a stand-in
        chosen = view.write_targets(pg_of(c, BITS))
        assert len([p for p in chosen if p != stalled]) == 2
    start = time.monotonic()
    ok, low = sim.reps[writer].wait_durable(ids, 2, timeout=10)
    assert ok and low >= 2
    assert time.monotonic() - start < 2.0


def test_fetch_gives_up_on_a_silent_holder_after_its_patience() -> None:
    sim = Sim(2, 2, 3)
    reader, holder = sim.ids
    ids = held_by(sim, [holder], 1)
    sim.down.add(holder)
    rep = sim.reps[reader]
    rep.fetch_patience = 0.6
    start = time.monotonic()
    with pytest.raises(ChunkNotFoundError, match="did not answer"):
        rep.fetch(ids)
    assert 0.6 <= time.monotonic() - start < 5


# -- membership ---------------------------------------------------------------------------
class Net:
    """Transport between in-process Memberships; `down` members do not answer."""

    def __init__(self) -> None:
        self.nodes: dict[str, Membership] = {}
        self.down: set[str] = set()

    def ping(self, target: Member, updates: list[Member]) -> list[Member]:
        if target.peer_id in self.down:
            raise PeerUnavailableError("down")
        return self.nodes[target.peer_id].handle_ping(updates)

    def ping_req(self, via: Member, target: Member, updates: list[Member]) -> bool:
        if via.peer_id in self.down:
            raise PeerUnavailableError("down")
        return self.nodes[via.peer_id].handle_ping_req(target.peer_id, updates)

    def sync(self, target: Member, members: list[Member]) -> list[Member]:
        if target.peer_id in self.down:
            raise PeerUnavailableError("down")
        return self.nodes[target.peer_id].handle_sync(members)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _swim(n: int, seed: int) -> tuple[Net, Clock, list[Membership]]:
    net, clock = Net(), Clock()
    rng = random.Random(seed)
    ms = []
    for i in range(n):
        me = Member(rng.randbytes(32).hex(), f"h:{i}", "z", 1, 0, 1, State.ALIVE)
        m = Membership(me, net, clock=clock, rng=random.Random(seed + i), probe_interval=1.0,
                       down_out_interval=10.0, indirect=2)
        net.nodes[me.peer_id] = m
        ms.append(m)
    for m in ms[1:]:                         # everyone joins through the first
        m.merge([ms[0].me])
        ms[0].merge([m.me])
    return net, clock, ms


def _run(ms: list[Membership], net: Net, clock: Clock, seconds: float) -> None:
    for _ in range(int(seconds)):
        clock.now += 1.0
        for m in ms:
            if m.me_id not in net.down:
                m.tick()


@pytest.mark.parametrize("seed", [1, 2])
def test_membership_spreads_suspects_then_marks_dead_then_out(seed: int) -> None:
    net, clock, ms = _swim(5, seed)
    _run(ms, net, clock, 15)
    assert all(len(m.live()) == 5 for m in ms), "gossip did not spread every member"
    victim = ms[3]
    net.down.add(victim.me_id)
    _run(ms, net, clock, 12)
    states = {m.get(victim.me_id).state for m in ms if m is not victim}
    assert states <= {State.DEAD, State.OUT} and State.DEAD in states | {State.DEAD}
    _run(ms, net, clock, 15)
    assert all(m.get(victim.me_id).state == State.OUT for m in ms if m is not victim)
    assert all(victim.me_id not in [p.peer_id for p in m.placed()] for m in ms
               if m is not victim)


def test_membership_restart_refutes_and_moves_nothing() -> None:
    net, clock, ms = _swim(4, 9)
    _run(ms, net, clock, 10)
    victim = ms[2]
    net.down.add(victim.me_id)
    _run(ms, net, clock, 6)                   # dead, not yet out
    assert any(m.get(victim.me_id).state in (State.SUSPECT, State.DEAD) for m in ms
               if m is not victim)
    epochs = [m.epoch() for m in ms if m is not victim]
    net.down.discard(victim.me_id)
    _run(ms, net, clock, 12)
    assert all(m.get(victim.me_id).state == State.ALIVE for m in ms)
    assert [m.epoch() for m in ms if m is not victim] == epochs   # placement never changed


def test_membership_is_thread_safe_under_concurrent_merges() -> None:
    net, clock, ms = _swim(3, 4)
    recs = [Member(os.urandom(32).hex(), "h", "z", 1, 0, i, State.ALIVE) for i in range(50)]
    threads = [threading.Thread(target=ms[0].merge, args=(recs[i::5],)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ms[0].members()) == 53


# -- pushes and repair together; the receiver's pipelined commit ----------------------------
class Gated(Remote):
    """A Remote whose pushes wait at a gate, and that records what each target received by
    push and by pull."""

    gate = threading.Event()
    log: list[tuple[str, str, ChunkId]] = []

    def put_stored_many(self, items: list[tuple[ChunkId, StoredChunk]]
                        ) -> tuple[list[ChunkId], list[ChunkId]]:
        assert Gated.gate.wait(10), "the test never opened the gate"
        Gated.log.extend(("push", self.peer, c) for c, _ in items)
        return super().put_stored_many(items)

    def pull(self, items: list[tuple[ChunkId, list[str]]]
             ) -> tuple[list[ChunkId], list[ChunkId]]:
        Gated.log.extend(("pull", self.peer, c) for c, _ in items)
        return super().pull(items)


def test_a_chunk_being_pushed_is_left_out_of_repair() -> None:
    sim = Sim(3, 3, 21)
    writer = sim.ids[0]
    Gated.gate.clear()
    Gated.log = []
    sim.remote = lambda me, peer: Gated(sim, me, peer)          # type: ignore[method-assign]
    rep = sim.reps[writer]
    rep.push_grace = 0.05
    ids = write(sim, writer, 40, 21)
    mine = [c for c in ids if sim.view(writer).primary(pg_of(c, BITS)) == writer]
    assert mine, "the writer is primary of none of the groups: pick another seed"
    try:
        rep.reconcile()                          # the pushes are all still at the gate
        assert not [c for kind, _, c in Gated.log if kind == "pull"], \
            "repair pulled chunks that were still being pushed"
    finally:
        Gated.gate.set()
    ok, _ = rep.wait_durable(ids, 3, timeout=10)
    assert ok
    assert rep.wait_pushed(10)
    rep.reconcile()
    sent = [(peer, c) for kind, peer, c in Gated.log]
    assert len(sent) == len(set(sent)), "a copy travelled twice (push and repair)"
    assert all(sim.copies(c) == 3 for c in ids)


class SlowLocal(MemLocal):
    """A LocalStore whose commits wait for a signal, recording each commit's size."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Semaphore(0)
        self.commits: list[int] = []

    def put_stored_many(self, items: list[tuple[ChunkId, StoredChunk]]
                        ) -> tuple[list[ChunkId], list[ChunkId]]:
        assert self.release.acquire(timeout=10), "a commit was never released"
        self.commits.append(len(items))
        return super().put_stored_many(items)


def _stored(n: int, size: int, seed: int) -> list[tuple[ChunkId, StoredChunk]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        data = rng.randbytes(size)
        out.append((ChunkId.of(data), StoredChunk(codec.RAW, size, data)))
    return out


def test_received_batches_commit_one_behind_the_stream() -> None:
    """A batch commits while the next one arrives; at most two batches are held."""
    local = SlowLocal()
    rep = Replicator(local, lambda p: None, lambda: None, commit_bytes=4000)  # type: ignore
    items = _stored(12, 1000, 3)                 # three batches of four
    yielded = threading.Semaphore(0)
    consumed: list[int] = []

    def stream() -> Iterator[tuple[ChunkId, StoredChunk]]:
        for i, item in enumerate(items):
            consumed.append(i)
            yielded.release()
            yield item

    stored: list[ChunkId] = []
    t = threading.Thread(target=lambda: rep.accept_stream("sender", stream(), stored))
    t.start()
    try:
        for _ in range(8):                       # the first batch commits, the second arrives
            assert yielded.acquire(timeout=10)
        assert not yielded.acquire(timeout=0.3), \
            "the stream ran more than one batch ahead of a commit still under way"
        assert len(consumed) == 8 and stored == []
    finally:
        for _ in range(3):
            local.release.release()
        t.join(10)
    assert not t.is_alive()
    assert local.commits == [4, 4, 4]
    assert sorted(stored) == sorted(c for c, _ in items)


def test_a_stream_that_breaks_keeps_what_was_committed() -> None:
    local = MemLocal()
    rep = Replicator(local, lambda p: None, lambda: None, commit_bytes=4000)  # type: ignore
    items = _stored(10, 1000, 4)

    def stream() -> Iterator[tuple[ChunkId, StoredChunk]]:
        yield from items[:6]
        raise PeerUnavailableError("stream broke")

    stored: list[ChunkId] = []
    with pytest.raises(PeerUnavailableError):
        rep.accept_stream("sender", stream(), stored)
    assert stored == [c for c, _ in items[:4]], "the committed batch was not reported"
    assert all(local.store.has(c) for c, _ in items[:4])
    assert not any(local.store.has(c) for c, _ in items[4:]), \
        "part of a batch that never finished arriving was stored"
