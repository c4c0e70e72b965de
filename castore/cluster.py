"""Cluster mode of a daemon (started with --listen): identity, enrolment, membership, placement
view, replication, repair loop, peer servers and metrics, composed around one Repo.

Composition only: the rules live in membership.py, replication.py and placement; the wire in
rpc/peer_*.py. The node creates a Cluster after the repo opens and stops it before the repo
closes.
"""
from __future__ import annotations

import functools
import logging
import shutil
import socket
import threading
import time
from typing import Any

from castore._proto import castore_pb2 as pb
from castore._proto import peer_pb2 as pp
from castore.config import Config
from castore.errors import CastoreError, ConfigError, UsageError
from castore.replication.holdings import RepoHoldings
from castore.identity import ClusterFile, JoinToken, cert_fingerprint, load_or_create
from castore.ids import ChunkId
from castore.membership import Member, Membership, State
from castore.metrics import Registry, serve_http
from castore.ids import PeerId
from castore.placement import PeerInfo, holders, preference_list
from castore.replication import ClusterView, Replicator
from castore.repo import Repo
from castore.store.lmdb import read_counters
from castore.nssync import NamespaceSync
from castore.rpc.peer_client import Peers, RemoteOpPeer, enrol, member_from_pb, member_to_pb
from castore.rpc.peer_server import (DynamicTrust, EnrolServicer, PeerServicer, serve_enrol,
                                     serve_peer)

log = logging.getLogger(__name__)
PG_BITS = 10


class Cluster:
    """One peer's membership in a cluster. start() joins (or creates, or rejoins) it."""

    def __init__(self, config: Config, repo: Repo) -> None:
        self.config = config
        self.repo = repo
        self.metrics = Registry()
        self.identity = load_or_create(config.home)
        self.peer_id = self.identity.peer_id
        self.holdings = RepoHoldings(repo.env, repo.store, repo.files)
        self._stop = threading.Event()
        self._repair_now = threading.Event()
        self._dirty = threading.Event()      # members changed: save cluster.json (not under
                                             # the membership lock, which calls on_change)
        self._threads: list[threading.Thread] = []
        self._servers: list[Any] = []
        self._http: Any = None
        self._file: ClusterFile | None = None
        self._save_mutex = threading.Lock()
        self._view_key: Any = None
        self._view: ClusterView | None = None
        self.listen = ""
        self.enrol_addr = ""
        self.membership: Membership
        self.replicator: Replicator

    # -- start and stop -------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        host, _, port = cfg.listen.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--listen wants HOST:PORT, got {cfg.listen!r}")
        zone = cfg.zone or socket.gethostname()
        capacity = cfg.capacity or shutil.disk_usage(cfg.home).total
        self._file = ClusterFile.load(cfg.home)
        saved = _saved_members(self._file) if self._file else []   # before any save
        saved_inc = int(self._file.members.get(self.peer_id, {}).get("incarnation", 0)) \
            if self._file else 0
        me = Member(self.peer_id, "", zone, capacity, self._used(),
                    max(saved_inc + 1, time.time_ns() // 1_000_000), State.ALIVE,
                    self.identity.cert_pem)
        self.peers = Peers(self.identity, self._lookup, cfg.max_message,
                           probe_timeout=max(0.2, cfg.probe_interval / 2), metrics=self.metrics)
        self.membership = Membership(me, self.peers, probe_interval=cfg.probe_interval,
                                     down_out_interval=cfg.down_out_interval,
                                     on_change=lambda m: self._dirty.set())
        self.replicator = Replicator(self.holdings, self.peers.store, self.view,
                                     max_transfers=cfg.max_repair_transfers,
                                     on_bytes=self._count_bytes)
        servicer = PeerServicer(self.membership, self.replicator, self.holdings)
        self.namespace = NamespaceSync(repo=self.repo, peers=self._op_peers,
                                       interval=max(1.0, min(5.0, cfg.probe_interval * 4)))
        servicer.namespace = self.namespace
        trust = DynamicTrust(self.identity, self._member_certs)
        server, bound = serve_peer(servicer, trust, cfg.listen, cfg.max_message, self.metrics)
        self._servers.append(server)
        self.listen = f"{host}:{bound}"
        self.membership.update_self(addr=self.listen)
        enrol_srv, enrol_port = serve_enrol(EnrolServicer(self._secret, self._admit),
                                            self.identity, host, 0)
        self._servers.append(enrol_srv)
        self.enrol_addr = f"{host}:{enrol_port}"
        if self._file is None:
            if cfg.token:
                self._join(cfg.token, cfg.join)
            else:
                self._file = ClusterFile.create(cfg.redundancy)
                log.info("created cluster %s (R=%d)", self._file.cluster_id[:10],
                         self._file.redundancy)
        else:
            self.membership.merge(saved)
        self._save()
        self.repo.env.on_commit = self._committed
        self.repo.fetch = self.replicator.fetch
        self.repo.durability = self.wait_durable
        self._describe_metrics()
        if cfg.metrics:
            mhost, _, mport = cfg.metrics.rpartition(":")
            self._http = serve_http(self.metrics, mhost or "127.0.0.1", int(mport))
        self.membership.announce()
        for name, fn in (("swim", lambda: self.membership.run(self._stop)),
                         ("repair", self._repair_loop)):
            t = threading.Thread(target=fn, name=f"castore-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        self.namespace.start()
        log.info("peer %s serving %s (enrolment %s)", self.peer_id[:10], self.listen,
                 self.enrol_addr)

    def stop(self) -> None:
        self._stop.set()
        self._repair_now.set()
        self.namespace.stop()
        self.repo.env.on_commit = None
        for t in self._threads:
            t.join(timeout=5)
        for s in self._servers:
            s.stop(grace=0.5).wait(2.0)
        if self._http is not None:
            self._http.shutdown()
        self.replicator.close()
        self.membership.close()
        self.peers.close()
        self._save()

    # -- enrolment ------------------------------------------------------------------------
    def _join(self, token_text: str, seed: str) -> None:
        token = JoinToken.decode(token_text)
        reply = enrol(self.identity, token.enrol_addr if not seed else _enrol_of(seed, token),
                      token.fingerprint, token.secret, self.membership.me)
        self._file = ClusterFile(reply.cluster_id, token.secret, int(reply.redundancy))
        self.membership.merge(member_from_pb(m) for m in reply.members)
        log.info("joined cluster %s through %s", reply.cluster_id[:10], token.enrol_addr)

    def _secret(self) -> str:
        assert self._file is not None
        return self._file.secret

    def _admit(self, joiner: Member) -> pp.JoinReply:
        assert self._file is not None
        self.membership.add(joiner)
        self._save()
        # tell the other members now, so they trust the newcomer's certificate before it calls
        threading.Thread(target=self._spread, args=(joiner.peer_id,), daemon=True,
                         name="castore-admit").start()
        return pp.JoinReply(cluster_id=self._file.cluster_id, redundancy=self._file.redundancy,
                            members=[member_to_pb(m) for m in self.membership.members()])

    def _spread(self, newcomer: str) -> None:
        for m in self.membership.live():
            if m.peer_id not in (self.peer_id, newcomer):
                try:
                    self.membership.merge(self.peers.sync(m, self.membership.members()))
                except CastoreError:
                    continue

    def _op_peers(self) -> dict[str, RemoteOpPeer]:
        """The members reachable now, for namespace sync."""
        return {m.peer_id: RemoteOpPeer(self.peers.store(m.peer_id))
                for m in self.membership.live() if m.peer_id != self.peer_id and m.addr}

    def invite(self) -> str:
        return JoinToken(self._secret(), self.enrol_addr,
                         cert_fingerprint(self.identity.cert_pem)).encode()

    def _member_certs(self) -> list[bytes]:
        return [m.cert_pem for m in self.membership.members()
                if m.cert_pem and m.state != State.LEFT]

    def _lookup(self, peer_id: str) -> Member | None:
        return self.membership.get(peer_id)

    def _save(self) -> None:
        if self._file is None:
            return
        self._dirty.clear()
        members = {m.peer_id: {"addr": m.addr, "zone": m.zone, "capacity": m.capacity,
                               "used": m.used, "incarnation": m.incarnation,
                               "state": int(m.state), "cert": m.cert_pem.decode()}
                   for m in self.membership.members()}
        with self._save_mutex:
            self._file.members = members
            self._file.save(self.config.home)

    # -- placement view -------------------------------------------------------------------
    @property
    def redundancy(self) -> int:
        return self._file.redundancy if self._file else self.config.redundancy

    def view(self) -> ClusterView:
        placed = self.membership.placed()
        members = [m for m in self.membership.live()
                   if not self.replicator.quarantined(m.peer_id)]
        live = frozenset(m.peer_id for m in members)
        suspect = frozenset(m.peer_id for m in members if m.state == State.SUSPECT)
        key = (tuple((m.peer_id, m.capacity, m.zone) for m in placed), live, suspect)
        if key == self._view_key and self._view is not None:
            return self._view
        seed = bytes.fromhex(self._file.cluster_id) if self._file else b""
        infos = [PeerInfo(PeerId.from_hex(m.peer_id), float(max(1, m.capacity)), m.zone)
                 for m in placed if not self.replicator.quarantined(m.peer_id)]
        r = self.redundancy

        def pref(pg: int) -> list[str]:
            return [p.hex for p in preference_list(pg, infos, bits=PG_BITS, seed=seed)]

        def tgt(pg: int) -> list[str]:
            return [p.hex for p in holders(pg, infos, r, bits=PG_BITS, seed=seed)]
        view = ClusterView(self.peer_id, r, live, tuple(p.id.hex for p in infos), PG_BITS,
                           functools.lru_cache(maxsize=None)(pref),
                           functools.lru_cache(maxsize=None)(tgt), suspect)
        self._view_key, self._view = key, view
        return view

    # -- replication hooks ----------------------------------------------------------------
    def _committed(self, ids: list[ChunkId]) -> None:
        self.replicator.submit(ids)

    def _content_ids(self, contents: list[str]) -> list[ChunkId]:
        out: list[ChunkId] = []
        for text in contents:
            if not text:
                continue
            cid = ChunkId.from_hex(text)
            out.append(cid)
            out.extend(self.holdings.manifest_chunks(cid))
        return out

    def wait_durable(self, contents: list[str], timeout: float) -> tuple[bool, int, int]:
        w = min(2, self.view().r_eff)
        ids = self._content_ids(contents)
        ok, low = self.replicator.wait_durable(ids, w, timeout)
        return ok, w, low

    def _count_bytes(self, peer: str, direction: str, n: int) -> None:
        self.metrics.inc("castore_peer_bytes_total", n, peer=peer[:16], direction=direction)

    def _used(self) -> int:
        try:
            return int(self.repo.env.read(lambda t: read_counters(t)["stored_bytes"]))
        except Exception:  # advisory; never fail the loop for it
            return 0

    # -- repair ---------------------------------------------------------------------------
    def _repair_loop(self) -> None:
        last_epoch = self.membership.epoch()
        changed_at: float | None = None
        last_pass = time.monotonic()
        last_used = 0.0
        while not self._stop.is_set():
            # a short tick: a pass starts within 0.1 s of the settle time after a change
            forced = self._repair_now.wait(0.1)
            if self._stop.is_set():
                return
            self.replicator.retry_due()
            if self._dirty.is_set():
                self._save()
            now = time.monotonic()
            if now - last_used > 5:
                self.membership.update_self(used=self._used())
                last_used = now
            epoch = self.membership.epoch()
            if epoch != last_epoch:
                last_epoch, changed_at = epoch, now
            settle = changed_at is not None and now - changed_at >= self.config.settle_seconds
            due = now - last_pass >= self.config.reconcile_interval
            if forced or settle or due:
                self._repair_now.clear()
                changed_at = None
                try:
                    self.replicator.reconcile()
                except Exception:  # one failed pass must not end repair for good
                    log.exception("repair pass failed")
                last_pass = time.monotonic()

    def repair(self, wait: bool, timeout: float) -> pb.RepairReply:
        """Start a repair pass now; with wait, repeat until this peer's groups have R_eff
        copies everywhere or the timeout passes."""
        started = time.monotonic()
        before = (self.replicator.stats.transfers, self.replicator.stats.dropped)
        if not wait:
            self._repair_now.set()
            return pb.RepairReply(done=False, seconds=0.0)
        # chunks still being pushed are left out of a pass: let this peer's pushes finish
        self.replicator.wait_pushed(timeout)
        stats = self.replicator.reconcile()
        while stats.under_replicated and time.monotonic() - started < timeout:
            time.sleep(0.2)
            stats = self.replicator.reconcile()
        return pb.RepairReply(done=stats.under_replicated == 0,
                              under_replicated=stats.under_replicated,
                              transfers=stats.transfers - before[0],
                              dropped=stats.dropped - before[1],
                              seconds=time.monotonic() - started)

    # -- reporting ------------------------------------------------------------------------
    def peers_reply(self) -> pb.PeersReply:
        out = []
        for m in self.membership.members():
            out.append(pb.PeerInfo(peer_id=m.peer_id, addr=m.addr, zone=m.zone,
                                   state=m.state.label, capacity=m.capacity, used=m.used,
                                   incarnation=m.incarnation,
                                   rejected=self.replicator.rejected.get(m.peer_id, 0),
                                   quarantined=self.replicator.quarantined(m.peer_id),
                                   self=m.peer_id == self.peer_id))
        v = self.view()
        return pb.PeersReply(peers=out, redundancy=v.redundancy, redundancy_effective=v.r_eff)

    def fill_status(self, reply: pb.StatusReply) -> None:
        v = self.view()
        st = self.replicator.stats
        reply.redundancy = v.redundancy
        reply.redundancy_effective = v.r_eff
        reply.peer_id = self.peer_id
        reply.listen = self.listen
        reply.live_peers = len(v.live)
        reply.members = len(self.membership.members())
        reply.under_replicated = st.under_replicated
        reply.repair_pending = st.pending
        reply.repair_done = st.transfers
        reply.replication_queue = max(0, self.replicator.queued)
        del reply.warnings[:]
        if v.r_eff < v.redundancy:
            reply.warnings.append(f"degraded: R_eff = {v.r_eff} < R = {v.redundancy} "
                                  f"({len(v.live)} live peer(s))")
        if v.r_eff == 1:
            reply.warnings.append("single live peer: no redundancy (R_eff = 1)")
        if st.under_replicated:
            reply.warnings.append(f"{st.under_replicated} chunk(s) have fewer than "
                                  f"R_eff copies; repair is running")

    def _describe_metrics(self) -> None:
        m = self.metrics
        m.describe("castore_peer_bytes_total", "counter", "chunk bytes sent to / received "
                   "from each peer")
        m.describe("castore_chunks_by_copies", "gauge", "chunks of the groups this peer "
                   "owns, by number of copies")
        m.describe("castore_repair_queue", "gauge", "repair transfers waiting")
        m.describe("castore_replication_queue", "gauge", "new chunks not yet pushed")
        m.describe("castore_rpc_seconds", "histogram", "peer RPC latency by method")
        m.describe("castore_members", "gauge", "members by state")
        m.describe("castore_rejected_chunks_total", "counter", "chunks rejected as corrupt, "
                   "by sender")

        def collect(reg: Registry) -> None:
            st = self.replicator.stats
            reg.clear("castore_chunks_by_copies")
            for n, count in st.by_copies.items():
                reg.set("castore_chunks_by_copies", count, copies=str(n))
            reg.set("castore_repair_queue", st.pending)
            reg.set("castore_replication_queue", max(0, self.replicator.queued))
            reg.clear("castore_members")
            for state in State:
                reg.set("castore_members", sum(1 for x in self.membership.members()
                                               if x.state == state), state=state.label)
            for peer, n in self.replicator.rejected.items():
                reg.set("castore_rejected_chunks_total", n, peer=peer[:16])
        m.collector(collect)


def _saved_members(f: ClusterFile) -> list[Member]:
    out = []
    for pid, rec in f.members.items():
        try:
            out.append(Member(pid, rec["addr"], rec["zone"], int(rec["capacity"]),
                              int(rec["used"]), int(rec["incarnation"]),
                              State(int(rec["state"])), rec["cert"].encode()))
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"cluster.json: a damaged member record ({exc})") from None
    return out


def _enrol_of(seed: str, token: JoinToken) -> str:
    """--join names the seed; the enrolment port comes from the token unless --join gives
    the enrolment address itself."""
    host, _, _ = seed.rpartition(":")
    thost, _, tport = token.enrol_addr.rpartition(":")
    return f"{host or thost}:{tport}" if seed != token.enrol_addr else seed

