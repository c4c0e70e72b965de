"""Talking to other peers: RemoteStore (a peer over mutual TLS is itself a store), the
membership transport, and the enrolment client a joiner uses before it is a member.

Channels pin the peer's own certificate as the only root and present this peer's key and
certificate; hostnames mean nothing for pinned self-signed certificates, so the target name is
overridden. Every call has a deadline; failures come back as CastoreErrors.
"""
from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from castore._proto import peer_pb2 as pp
from castore._proto import peer_pb2_grpc as ppg
from castore.errors import CastoreError, ConfigError, PeerUnavailableError
from castore.identity import SAN, Identity, cert_fingerprint, enrol_proof
from castore.ids import ChunkId
from castore.membership import Member, State
from castore.metrics import Registry
from castore.rpc.errors import from_rpc_error
from castore.ops import Op
from castore.store import StoredChunk

Batch = list[tuple[ChunkId, StoredChunk]]
KEEPALIVE_MS = 5000          # silence on a connection after which it is pinged, and the wait
                             # for the answer before it is dropped


def channel_options(max_message: int) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.ssl_target_name_override", SAN),
            # a peer that stops answering but keeps its connection open (suspended, stopped,
            # its network gone without a reset) is found within 10 s of silence: a call
            # on it fails then instead of waiting out its deadline. Both ends allow the pings
            # however quiet a call is (a Pull that works for minutes sends nothing meanwhile).
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
            ("grpc.http2.max_ping_strikes", 0),
            # a peer that refused us (not yet told we joined) or restarted must be retried
            # soon, not after gRPC's default backoff of up to two minutes
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
            ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
            ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20)]


def member_to_pb(m: Member, with_cert: bool = True) -> pp.Member:
    return pp.Member(peer_id=m.peer_id, addr=m.addr, zone=m.zone, capacity=m.capacity,
                     used=m.used, incarnation=m.incarnation, state=int(m.state),
                     cert_pem=m.cert_pem if with_cert else b"")


def member_from_pb(m: pp.Member) -> Member:
    return Member(peer_id=m.peer_id, addr=m.addr, zone=m.zone, capacity=m.capacity,
                  used=m.used, incarnation=m.incarnation, state=State(m.state),
                  cert_pem=bytes(m.cert_pem))


def _cid(raw: bytes) -> ChunkId:
    if len(raw) != 32:
        raise PeerUnavailableError(f"a peer sent a malformed id ({len(raw)} bytes)")
    return ChunkId(bytes(raw))


class RemoteStore:
    """One peer as a PeerStore (castore.replication). Thread-safe; one channel per peer."""

    def __init__(self, member: Member, identity: Identity, max_message: int,
                 rpc_timeout: float = 10.0, stream_timeout: float = 300.0,
                 metrics: Registry | None = None) -> None:
        self.member = member
        creds = grpc.ssl_channel_credentials(root_certificates=member.cert_pem,
                                             private_key=identity.key_pem,
                                             certificate_chain=identity.cert_pem)
        self._channel = grpc.secure_channel(member.addr, creds,
                                            options=channel_options(max_message))
        self.stub = ppg.PeerStub(self._channel)
        self.rpc_timeout = rpc_timeout
        self.stream_timeout = stream_timeout
        self.max_message = max_message
        self._metrics = metrics

    def close(self) -> None:
        self._channel.close()

    def _fail(self, exc: grpc.RpcError, what: str) -> CastoreError:
        err = from_rpc_error(exc, f"{what} on peer {self.member.peer_id[:10]}")
        if isinstance(err, CastoreError) and type(err) is CastoreError:
            return PeerUnavailableError(str(err))
        return err

    # -- BlobStore ------------------------------------------------------------------------
    def has(self, cid: ChunkId) -> bool:
        return self.has_many([cid])[0]

    def get(self, cid: ChunkId) -> bytes:
        from castore import codec
        from castore.errors import ChunkNotFoundError
        from castore.store.memory import verify
        for got, stored in self.get_stored_many([cid]):
            data = bytes(codec.decode(stored.codec, stored.data, stored.raw_len))
            verify(cid, data)
            return data
        raise ChunkNotFoundError(f"peer {self.member.peer_id[:10]} has no chunk {cid}")

    def get_stored(self, cid: ChunkId) -> StoredChunk:
        from castore.errors import ChunkNotFoundError
        for _, stored in self.get_stored_many([cid]):
            return stored
        raise ChunkNotFoundError(f"peer {self.member.peer_id[:10]} has no chunk {cid}")

    def put(self, cid: ChunkId, data: bytes | memoryview) -> bool:
        from castore import codec
        tag, stored = codec.encode(data, 1)
        return self.put_stored(cid, StoredChunk(tag, len(data), bytes(stored)))

    def put_stored(self, cid: ChunkId, chunk: StoredChunk) -> bool:
        from castore.errors import IntegrityError
        stored, rejected = self.put_stored_many([(cid, chunk)])
        if rejected:
            raise IntegrityError(f"peer {self.member.peer_id[:10]} rejected {cid}: its bytes "
                                 "do not hash to it")
        return bool(stored)

    def delete(self, cid: ChunkId) -> None:
        self.drop([cid])

    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]:
        for cid in sorted(self.list_ids(0, [])):
            if after is None or cid > after:
                yield cid

    # -- PeerStore ------------------------------------------------------------------------
    def has_many(self, ids: list[ChunkId]) -> list[bool]:
        try:
            reply = self.stub.Has(pp.Ids(ids=[c.digest for c in ids]), timeout=self.rpc_timeout)
        except grpc.RpcError as exc:
            raise self._fail(exc, "has") from exc
        if len(reply.present) != len(ids):
            raise PeerUnavailableError("a peer answered Has with the wrong number of flags")
        return [b == 1 for b in reply.present]

    def put_stored_many(self, items: Batch) -> tuple[list[ChunkId], list[ChunkId]]:
        def requests() -> Iterator[pp.StoredBlob]:
            for cid, s in items:
                yield pp.StoredBlob(id=cid.digest, codec=s.codec, raw_len=s.raw_len,
                                    data=s.data)
        try:
            reply = self.stub.PutBlobs(requests(), timeout=self.stream_timeout)
        except grpc.RpcError as exc:
            raise self._fail(exc, "put") from exc
        if self._metrics is not None:
            self._metrics.inc("castore_peer_bytes_total", sum(len(s.data) for _, s in items),
                              peer=self.member.peer_id[:16], direction="out")
        return [_cid(i) for i in reply.stored], [_cid(i) for i in reply.rejected]

    def get_stored_many(self, ids: list[ChunkId], timeout: float | None = None
                        ) -> Iterator[tuple[ChunkId, StoredChunk]]:
        try:
            for blob in self.stub.GetBlobs(pp.Ids(ids=[c.digest for c in ids]),
                                           timeout=min(timeout or self.stream_timeout,
                                                       self.stream_timeout)):
                yield _cid(blob.id), StoredChunk(blob.codec, blob.raw_len, bytes(blob.data))
        except grpc.RpcError as exc:
            raise self._fail(exc, "get") from exc

    def list_ids(self, pg_bits: int, pgs: list[int]) -> Iterator[ChunkId]:
        try:
            for page in self.stub.ListIds(pp.ListRequest(pg_bits=pg_bits, pgs=pgs),
                                          timeout=self.stream_timeout):
                for raw in page.ids:
                    yield _cid(raw)
        except grpc.RpcError as exc:
            raise self._fail(exc, "list") from exc

    def pull(self, items: list[tuple[ChunkId, list[str]]]) -> tuple[list[ChunkId],
                                                                     list[ChunkId]]:
        req = pp.PullRequest(items=[pp.PullItem(id=c.digest, sources=s) for c, s in items])
        try:
            reply = self.stub.Pull(req, timeout=self.stream_timeout)
        except grpc.RpcError as exc:
            raise self._fail(exc, "pull") from exc
        return [_cid(i) for i in reply.stored], [_cid(i) for i in reply.failed]

    def drop(self, ids: list[ChunkId]) -> int:
        try:
            return int(self.stub.Drop(pp.Ids(ids=[c.digest for c in ids]),
                                      timeout=self.rpc_timeout).dropped)
        except grpc.RpcError as exc:
            raise self._fail(exc, "drop") from exc


class RemoteOpPeer:
    """One peer's namespace endpoints (castore.nssync.OpPeer) over its peer service."""

    def __init__(self, store: RemoteStore) -> None:
        self._store = store

    def _call(self, what: str, fn: Any, request: Any, timeout: float) -> Any:
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._store._fail(exc, what) from exc

    def push_ops(self, ops: list[Op]) -> int:
        reply = self._call("push ops", self._store.stub.PushOps,
                           pp.OpBatch(ops=[op.encode() for op in ops]), self._store.rpc_timeout)
        return int(reply.applied)

    def pull_ops(self, vv: dict[bytes, int]) -> list[Op]:
        reply = self._call("pull ops", self._store.stub.PullOps,
                           pp.VersionVector(seqs={k.hex(): v for k, v in vv.items()}),
                           self._store.rpc_timeout)
        return [Op.decode(raw) for raw in reply.ops]

    def snapshot(self) -> Iterator[tuple[str, bytes, bytes]]:
        try:
            for batch in self._store.stub.Snapshot(pp.SnapshotRequest(),
                                                   timeout=self._store.stream_timeout):
                for row in batch.rows:
                    yield row.table, row.key, row.value
        except grpc.RpcError as exc:
            raise self._store._fail(exc, "snapshot") from exc


class Peers:
    """Channels to members, made on first use and remade when a member's address or
    certificate changes. Also the membership Transport."""

    def __init__(self, identity: Identity, lookup: Any, max_message: int,
                 probe_timeout: float = 0.5, metrics: Registry | None = None) -> None:
        self.identity = identity
        self._lookup = lookup            # peer id -> Member | None
        self.max_message = max_message
        self.probe_timeout = probe_timeout
        self.metrics = metrics
        self._stores: dict[str, RemoteStore] = {}
        self._mutex = threading.Lock()

    def store(self, peer_id: str) -> RemoteStore:
        member = self._lookup(peer_id)
        if member is None:
            raise PeerUnavailableError(f"peer {peer_id[:10]} is not a member of this cluster")
        return self._for(member)

    def _for(self, member: Member) -> RemoteStore:
        with self._mutex:
            rs = self._stores.get(member.peer_id)
            if rs is None or rs.member.addr != member.addr or \
                    rs.member.cert_pem != member.cert_pem:
                if rs is not None:
                    rs.close()
                rs = self._stores[member.peer_id] = RemoteStore(
                    member, self.identity, self.max_message, metrics=self.metrics)
            return rs

    def close(self) -> None:
        with self._mutex:
            for rs in self._stores.values():
                rs.close()
            self._stores.clear()

    # -- membership Transport -------------------------------------------------------------
    def ping(self, target: Member, updates: list[Member]) -> list[Member]:
        try:
            reply = self._for(target).stub.Ping(
                pp.PingRequest(from_id=self.identity.peer_id,
                               updates=[member_to_pb(m) for m in updates]),
                timeout=self.probe_timeout)
        except grpc.RpcError as exc:
            raise PeerUnavailableError(f"peer {target.peer_id[:10]} did not answer a ping") \
                from exc
        return [member_from_pb(m) for m in reply.updates]

    def ping_req(self, via: Member, target: Member, updates: list[Member]) -> bool:
        try:
            reply = self._for(via).stub.PingReq(
                pp.PingReqRequest(from_id=self.identity.peer_id, target_id=target.peer_id,
                                  updates=[member_to_pb(m) for m in updates]),
                timeout=self.probe_timeout * 2)
        except grpc.RpcError as exc:
            raise PeerUnavailableError(f"peer {via.peer_id[:10]} did not relay a ping") \
                from exc
        return bool(reply.ok)

    def sync(self, target: Member, members: list[Member]) -> list[Member]:
        try:
            reply = self._for(target).stub.Sync(
                pp.SyncRequest(members=[member_to_pb(m) for m in members]),
                timeout=max(2.0, self.probe_timeout * 4))
        except grpc.RpcError as exc:
            raise PeerUnavailableError(f"peer {target.peer_id[:10]} did not sync") from exc
        return [member_from_pb(m) for m in reply.members]


def enrol(identity: Identity, enrol_addr: str, fingerprint: str, secret: str, me: Member,
          timeout: float = 10.0) -> pp.JoinReply:
    """Join through a seed's enrolment service: fetch its certificate, pin it by the token's
    fingerprint, prove the secret (HMAC over a server nonce and this peer's fingerprint)."""
    host, _, port = enrol_addr.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError) as exc:
        raise PeerUnavailableError(f"cannot reach the seed's enrolment service at "
                                   f"{enrol_addr}: {exc}") from None
    if cert_fingerprint(pem.encode()) != fingerprint:
        raise ConfigError(f"the peer at {enrol_addr} is not the seed the token names "
                          "(certificate fingerprint mismatch)")
    creds = grpc.ssl_channel_credentials(root_certificates=pem.encode())
    channel = grpc.secure_channel(enrol_addr, creds, options=channel_options(16 << 20))
    try:
        stub = ppg.EnrolStub(channel)
        nonce = stub.GetChallenge(pp.ChallengeRequest(), timeout=timeout).nonce
        proof = enrol_proof(secret, nonce, identity.peer_id)
        return stub.Join(pp.JoinRequest(cert_pem=identity.cert_pem, nonce=nonce, proof=proof,
                                        self=member_to_pb(me)), timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
            raise ConfigError(f"the seed refused to enrol this peer: {exc.details()}") from None
        raise from_rpc_error(exc, "join") from exc
    finally:
        channel.close()
