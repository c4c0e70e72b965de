"""SWIM-style membership: who is in the cluster and in what state (alive, suspect, dead, out).

Owns the member table and the failure-detection rules: probe one member per period, ask k
others to probe it indirectly when it does not answer, suspect it, declare it dead after the
suspicion timeout and out after the down-out interval. Updates ride on pings; a full-state
exchange runs every few periods. Only "out" removes a member from placement, so a restart
within the interval moves no data. Transport and clock are injected (tests drive this without
a network); must not import grpc, castore._proto or castore.rpc.
"""
from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Protocol

from castore.errors import CastoreError

log = logging.getLogger(__name__)


class State(IntEnum):
    """Precedence at equal incarnation follows the value: a later state wins."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    OUT = 3
    LEFT = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Member:
    peer_id: str
    addr: str
    zone: str
    capacity: int
    used: int
    incarnation: int
    state: State
    cert_pem: bytes = b""

    def supersedes(self, other: Member) -> bool:
        """SWIM's rule: a higher incarnation wins; at equal incarnation the later state."""
        return (self.incarnation, self.state) > (other.incarnation, other.state)


class Transport(Protocol):
    """How membership reaches a peer. Every call raises CastoreError (typically
    PeerUnavailableError) when the peer does not answer within the probe timeout."""

    def ping(self, target: Member, updates: list[Member]) -> list[Member]: ...
    def ping_req(self, via: Member, target: Member, updates: list[Member]) -> bool: ...
    def sync(self, target: Member, members: list[Member]) -> list[Member]: ...


class Membership:
    """The member table of one peer. Thread-safe. tick() runs one protocol period; the
    handle_* methods serve the peer's side of the protocol."""

    def __init__(self, me: Member, transport: Transport, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, probe_interval: float = 1.0,
                 suspicion_mult: float = 4.0, down_out_interval: float = 600.0,
                 indirect: int = 3, sync_every: int = 5, max_piggyback: int = 8,
                 on_change: Callable[[Member], None] | None = None) -> None:
        self.me_id = me.peer_id
        self._members: dict[str, Member] = {me.peer_id: me}
        self._since: dict[str, float] = {me.peer_id: clock()}
        self._transport = transport
        self._clock = clock
        self._rng = rng or random.Random()
        self.probe_interval = probe_interval
        self.suspicion_mult = suspicion_mult
        self.down_out_interval = down_out_interval
        self.indirect = indirect
        self.sync_every = sync_every
        self.max_piggyback = max_piggyback
        self._on_change = on_change
        self._mutex = threading.RLock()
        self._gossip: dict[str, int] = {}         # peer id -> retransmissions left
        self._order: list[str] = []
        self._period = 0
        self._seq = 0
        self._pool = ThreadPoolExecutor(max(1, indirect), thread_name_prefix="castore-swim")

    # -- views ----------------------------------------------------------------------------
    @property
    def me(self) -> Member:
        return self._members[self.me_id]

    def members(self) -> list[Member]:
        with self._mutex:
            return sorted(self._members.values(), key=lambda m: m.peer_id)

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def live(self) -> list[Member]:
        """Members that answer (alive or merely suspected): where reads and writes go."""
        return [m for m in self.members() if m.state in (State.ALIVE, State.SUSPECT)]

    def placed(self) -> list[Member]:
        """Members placement counts: everyone not out or gone. A dead member keeps its place
        until it is out, so a restart moves nothing."""
        return [m for m in self.members() if m.state < State.OUT]

    def epoch(self) -> tuple[tuple[str, int, str, bool], ...]:
        """What placement depends on; changes when a member joins, leaves or is out."""
        return tuple((m.peer_id, m.capacity, m.zone, m.state < State.OUT)
                     for m in self.members() if m.state < State.OUT)

    # -- merging --------------------------------------------------------------------------
    def merge(self, records: Iterable[Member]) -> bool:
        """Apply gossiped records; returns True if anything changed. A record about this peer
        that says it is not alive is refuted with a higher incarnation."""
        changed = False
        with self._mutex:
            for rec in records:
                if rec.peer_id == self.me_id:
                    me = self.me
                    if rec.state != State.ALIVE and rec.incarnation >= me.incarnation:
                        self._set(replace(me, incarnation=rec.incarnation + 1,
                                          state=State.ALIVE))
                        changed = True
                    continue
                old = self._members.get(rec.peer_id)
                if old is None or rec.supersedes(old):
                    if not rec.cert_pem and old is not None:
                        rec = replace(rec, cert_pem=old.cert_pem)
                    self._set(rec)
                    changed = True
        return changed

    def _set(self, rec: Member) -> None:
        old = self._members.get(rec.peer_id)
        self._members[rec.peer_id] = rec
        if old is None or old.state != rec.state:
            self._since[rec.peer_id] = self._clock()
            log.info("member %s (%s) is %s", rec.peer_id[:10], rec.addr, rec.state.label)
        n = len(self._members)
        self._gossip[rec.peer_id] = 3 * max(1, math.ceil(math.log2(n + 1)))
        if self._on_change is not None and (old is None or old.state != rec.state
                                            or old.addr != rec.addr):
            self._on_change(rec)

    def update_self(self, *, used: int | None = None, addr: str | None = None) -> None:
        """Change this peer's own soft facts; gossip them with a new incarnation."""
        with self._mutex:
            me = self.me
            new = replace(me, used=me.used if used is None else used,
                          addr=me.addr if addr is None else addr)
            if new != me:
                self._set(replace(new, incarnation=me.incarnation + 1))

    def add(self, rec: Member) -> None:
        """Admit a member (enrolment): it is alive as of now."""
        self.merge([rec])

    def _piggyback(self) -> list[Member]:
        with self._mutex:
            picked = sorted(self._gossip, key=lambda p: -self._gossip[p])[:self.max_piggyback]
            out = []
            for pid in picked:
                self._gossip[pid] -= 1
                if self._gossip[pid] <= 0:
                    del self._gossip[pid]
                out.append(self._members[pid])
            return out

    # -- serving the protocol -------------------------------------------------------------
    def handle_ping(self, updates: list[Member]) -> list[Member]:
        self.merge(updates)
        return self._piggyback() + [self.me]

    def handle_ping_req(self, target_id: str, updates: list[Member]) -> bool:
        self.merge(updates)
        target = self.get(target_id)
        if target is None:
            return False
        try:
            self.merge(self._transport.ping(target, self._piggyback()))
            return True
        except CastoreError:
            return False

    def handle_sync(self, members: list[Member]) -> list[Member]:
        self.merge(members)
        return self.members()

    # -- the protocol period --------------------------------------------------------------
    def tick(self) -> None:
        """One protocol period: probe one member, advance timers, sometimes push-pull."""
        self._period += 1
        target = self._next_target()
        if target is not None:
            self._probe(target)
        self._advance_timers()
        if self._period % self.sync_every == 0:
            self._sync_random()

    def _next_target(self) -> Member | None:
        with self._mutex:
            if not self._order:
                self._order = [p for p, m in self._members.items()
                               if p != self.me_id and m.state != State.LEFT]
                self._rng.shuffle(self._order)
            while self._order:
                m = self._members.get(self._order.pop())
                if m is not None and m.state != State.LEFT:
                    return m
            return None

    def _probe(self, target: Member) -> None:
        try:
            # the target's own record rides along, so it can refute a suspicion at once
            self.merge(self._transport.ping(target, self._piggyback() + [target]))
            return
        except CastoreError:
            pass
        if target.state >= State.DEAD:
            return                    # dead members are probed, but not suspected again
        helpers = [m for m in self.live() if m.peer_id not in (self.me_id, target.peer_id)]
        self._rng.shuffle(helpers)
        futures = [self._pool.submit(self._indirect, h, target)
                   for h in helpers[:self.indirect]]
        if any(f.result() for f in futures):
            return
        self._suspect(target.peer_id)

    def _indirect(self, via: Member, target: Member) -> bool:
        try:
            return self._transport.ping_req(via, target, self._piggyback())
        except CastoreError:
            return False

    def _suspect(self, peer_id: str) -> None:
        with self._mutex:
            m = self._members.get(peer_id)
            if m is not None and m.state == State.ALIVE:
                self._set(replace(m, state=State.SUSPECT))

    def suspicion_timeout(self) -> float:
        n = max(1, len(self._members))
        return self.suspicion_mult * max(1.0, math.log10(n)) * self.probe_interval

    def _advance_timers(self) -> None:
        now = self._clock()
        with self._mutex:
            for pid, m in list(self._members.items()):
                if pid == self.me_id:
                    continue
                age = now - self._since.get(pid, now)
                if m.state == State.SUSPECT and age >= self.suspicion_timeout():
                    self._set(replace(m, state=State.DEAD))
                elif m.state == State.DEAD and age >= self.down_out_interval:
                    self._set(replace(m, state=State.OUT))

    def _sync_random(self) -> None:
        others = [m for m in self.live() if m.peer_id != self.me_id]
        dead = [m for m in self.members() if m.state in (State.DEAD, State.OUT)]
        pool = others or dead
        if not pool:
            return
        target = self._rng.choice(pool)
        try:
            self.merge(self._transport.sync(target, self.members()))
        except CastoreError:
            pass

    def announce(self) -> None:
        """Tell every known member this peer is here (after a start or restart)."""
        for m in self.members():
            if m.peer_id == self.me_id:
                continue
            try:
                self.merge(self._transport.sync(m, self.members()))
            except CastoreError:
                continue

    def run(self, stop: threading.Event) -> None:
        """Run protocol periods until stop is set (the daemon's membership thread)."""
        while not stop.wait(self.probe_interval):
            try:
                self.tick()
            except Exception:  # a bug in one period must not end failure detection
                log.exception("membership period failed")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
