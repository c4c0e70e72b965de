"""The peer service (castore.v1.Peer, mutual TLS, members only) and the enrolment service
(castore.v1.Enrol, server-side TLS, proves the cluster secret). Wire adapters: membership,
replication and holdings do the work.

The peer server's trust store is the set of member certificates, swapped through
grpc.dynamic_ssl_server_credentials whenever a member joins (the fetcher runs on every new
connection). Every handler also maps the caller's certificate to a member and refuses others.
"""
from __future__ import annotations

import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from castore._proto import peer_pb2 as pp
from castore._proto import peer_pb2_grpc as ppg
from castore.replication.holdings import RepoHoldings
from castore.identity import Identity, cert_fingerprint, check_proof
from castore.ids import ChunkId
from castore.membership import Member, Membership, State
from castore.metrics import Registry
from castore.replication import Replicator, pg_of
from castore.errors import CastoreError, PeerUnavailableError
from castore.ops import Op, OpType, check_name
from castore.rpc.errors import abort_on_error
from castore.rpc.peer_client import _cid, channel_options, member_from_pb, member_to_pb
from castore.store import StoredChunk

log = logging.getLogger(__name__)


class _Latency(grpc.ServerInterceptor):
    """Observe each call's duration into castore_rpc_seconds{method}."""

    def __init__(self, metrics: Registry) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        metrics = self._metrics

        def timed(fn: Any, streaming: bool) -> Any:
            if fn is None:
                return None

            def unary(request: Any, context: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(request, context)
                finally:
                    metrics.observe("castore_rpc_seconds", time.perf_counter() - start,
                                    method=method)

            def stream(request: Any, context: Any) -> Any:
                start = time.perf_counter()
                try:
                    yield from fn(request, context)
                finally:
                    metrics.observe("castore_rpc_seconds", time.perf_counter() - start,
                                    method=method)
            return stream if streaming else unary
        return handler._replace(
            unary_unary=timed(handler.unary_unary, False),
            stream_unary=timed(handler.stream_unary, False),
            unary_stream=timed(handler.unary_stream, True),
            stream_stream=timed(handler.stream_stream, True))


class PeerServicer(ppg.PeerServicer):
    """Translate protobuf <-> membership / replication calls, for members only."""

    def __init__(self, membership: Membership, replicator: Replicator,
                 holdings: RepoHoldings) -> None:
        self._ms = membership
        self._rep = replicator
        self._hold = holdings
        self._fp_cache: dict[bytes, str] = {}
        self.namespace: Any = None           # NamespaceSync, set by the cluster

    def _caller(self, context: grpc.ServicerContext) -> str:
        pems = context.auth_context().get("x509_pem_cert") or []
        if not pems:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "castore peers must present a "
                          "member certificate")
        pem = bytes(pems[0])
        pid = self._fp_cache.get(pem)
        if pid is None:
            pid = self._fp_cache[pem] = cert_fingerprint(pem)
        m = self._ms.get(pid)
        if m is None or m.state == State.LEFT:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"peer {pid[:10]} is not a member of this cluster")
        return pid

    def Ping(self, request: pp.PingRequest, context: grpc.ServicerContext) -> pp.PingReply:
        self._caller(context)
        out = self._ms.handle_ping([member_from_pb(m) for m in request.updates])
        return pp.PingReply(ok=True, updates=[member_to_pb(m) for m in out])

    def PingReq(self, request: pp.PingReqRequest, context: grpc.ServicerContext
                ) -> pp.PingReply:
        self._caller(context)
        ok = self._ms.handle_ping_req(request.target_id,
                                      [member_from_pb(m) for m in request.updates])
        return pp.PingReply(ok=ok)

    def Sync(self, request: pp.SyncRequest, context: grpc.ServicerContext) -> pp.SyncReply:
        self._caller(context)
        out = self._ms.handle_sync([member_from_pb(m) for m in request.members])
        return pp.SyncReply(members=[member_to_pb(m) for m in out])

    # -- namespace ------------------------------------------------------------------------
    def PushOps(self, request: pp.OpBatch, context: grpc.ServicerContext) -> pp.OpAck:
        self._caller(context)
        with abort_on_error(context):
            ops = _decode_ops(request.ops, context)
            return pp.OpAck(applied=self.namespace.receive(ops) if self.namespace else 0)

    def PullOps(self, request: pp.VersionVector, context: grpc.ServicerContext) -> pp.OpBatch:
        self._caller(context)
        with abort_on_error(context):
            vv = {bytes.fromhex(k): int(v) for k, v in request.seqs.items()}
            return pp.OpBatch(ops=[op.encode() for op in self._hold_repo().ops_since(vv)])

    def Snapshot(self, request: pp.SnapshotRequest, context: grpc.ServicerContext
                 ) -> Iterator[pp.SnapshotRows]:
        self._caller(context)
        with abort_on_error(context):
            rows: list[pp.SnapshotRow] = []
            for table, key, value in self._hold_repo().export_snapshot():
                rows.append(pp.SnapshotRow(table=table, key=key, value=value))
                if len(rows) >= 4096:
                    yield pp.SnapshotRows(rows=rows)
                    rows = []
            if rows:
                yield pp.SnapshotRows(rows=rows)

    def _hold_repo(self) -> Any:
        if self.namespace is None:
            raise PeerUnavailableError("this peer does not share its namespace yet")
        return self.namespace.repo

    def Has(self, request: pp.Ids, context: grpc.ServicerContext) -> pp.HasReply:
        self._caller(context)
        with abort_on_error(context):
            flags = self._hold.has_many([_cid(i) for i in request.ids])
            return pp.HasReply(present=bytes(1 if f else 0 for f in flags))

    def PutBlobs(self, request_iterator: Iterator[pp.StoredBlob],
                 context: grpc.ServicerContext) -> pp.PutReply:
        sender = self._caller(context)
        if self._rep.quarantined(sender):
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"peer {sender[:10]} sent corrupt chunks; its data is ignored")

        def blobs() -> Iterator[tuple[ChunkId, StoredChunk]]:
            for blob in request_iterator:
                yield _cid(blob.id), StoredChunk(blob.codec, blob.raw_len, bytes(blob.data))
        with abort_on_error(context):
            # verified and committed in batches while the rest of the stream arrives
            stored, rejected = self._rep.handle_put(sender, blobs())
        return pp.PutReply(stored=[c.digest for c in stored],
                           rejected=[c.digest for c in rejected])

    def GetBlobs(self, request: pp.Ids, context: grpc.ServicerContext
                 ) -> Iterator[pp.StoredBlob]:
        self._caller(context)
        with abort_on_error(context):
            ids = [_cid(raw) for raw in request.ids]
            for cid, s in self._hold.get_stored_many(ids):   # in map order, read ahead
                yield pp.StoredBlob(id=cid.digest, codec=s.codec, raw_len=s.raw_len,
                                    data=s.data)

    def ListIds(self, request: pp.ListRequest, context: grpc.ServicerContext
                ) -> Iterator[pp.Ids]:
        self._caller(context)
        wanted = set(request.pgs)
        page: list[bytes] = []
        for cid in self._hold.ids():
            if wanted and pg_of(cid, request.pg_bits) not in wanted:
                continue
            if self._rep.pushing(cid):
                continue             # its push places it; a repair pull would copy it twice
            page.append(cid.digest)
            if len(page) >= 4096:
                yield pp.Ids(ids=page)
                page = []
        if page:
            yield pp.Ids(ids=page)

    def Pull(self, request: pp.PullRequest, context: grpc.ServicerContext) -> pp.PullReply:
        self._caller(context)
        with abort_on_error(context):
            done, failed = self._rep.handle_pull(
                [(_cid(i.id), list(i.sources)) for i in request.items])
        return pp.PullReply(stored=[c.digest for c in done], failed=[c.digest for c in failed])

    def Drop(self, request: pp.Ids, context: grpc.ServicerContext) -> pp.DropReply:
        self._caller(context)
        with abort_on_error(context):
            return pp.DropReply(dropped=self._rep.handle_drop([_cid(i) for i in request.ids]))


def _decode_ops(raw: Iterable[bytes], context: grpc.ServicerContext) -> list[Op]:
    """Ops from a peer are hostile input: a malformed one fails the call, applying nothing."""
    ops = []
    for buf in raw:
        try:
            op = Op.decode(buf)
            if op.type == OpType.MOVE:
                check_name(op.name)
        except (ValueError, struct.error, CastoreError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed namespace op: {exc}")
        ops.append(op)
    return ops


class EnrolServicer(ppg.EnrolServicer):
    """Admit a peer that proves the cluster secret; answer with the member list."""

    def __init__(self, secret: Callable[[], str], admit: Callable[[Member], pp.JoinReply]
                 ) -> None:
        self._secret = secret
        self._admit = admit
        self._nonces: dict[bytes, float] = {}
        self._mutex = threading.Lock()

    def GetChallenge(self, request: pp.ChallengeRequest, context: grpc.ServicerContext
                     ) -> pp.Challenge:
        nonce = os.urandom(32)
        now = time.monotonic()
        with self._mutex:
            self._nonces = {n: t for n, t in self._nonces.items() if now - t < 60}
            if len(self._nonces) > 1024:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many pending joins")
            self._nonces[nonce] = now
        return pp.Challenge(nonce=nonce)

    def Join(self, request: pp.JoinRequest, context: grpc.ServicerContext) -> pp.JoinReply:
        with self._mutex:
            issued = self._nonces.pop(bytes(request.nonce), None)   # one use only
        if issued is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown or used join challenge")
        try:
            fp = cert_fingerprint(bytes(request.cert_pem))
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the certificate does not parse")
        if not check_proof(self._secret(), bytes(request.nonce), fp, bytes(request.proof)):
            log.warning("refused a join: wrong cluster secret (certificate %s)", fp[:10])
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "wrong join token: the cluster secret does not match")
        me = member_from_pb(request.self)
        joiner = Member(peer_id=fp, addr=me.addr, zone=me.zone, capacity=me.capacity,
                        used=me.used, incarnation=me.incarnation, state=State.ALIVE,
                        cert_pem=bytes(request.cert_pem))
        return self._admit(joiner)


class DynamicTrust:
    """The peer server's trust store: this peer's key pair plus every member certificate."""

    def __init__(self, identity: Identity, certs: Callable[[], list[bytes]]) -> None:
        self._identity = identity
        self._certs = certs
        self._digest = b""

    def _config(self) -> Any:
        roots = b"".join(sorted(set(self._certs()) | {self._identity.cert_pem}))
        self._digest = hashlib.sha256(roots).digest()
        return grpc.ssl_server_certificate_configuration(
            [(self._identity.key_pem, self._identity.cert_pem)], root_certificates=roots)

    def fetch(self) -> Any:
        try:
            roots = b"".join(sorted(set(self._certs()) | {self._identity.cert_pem}))
            if hashlib.sha256(roots).digest() == self._digest:
                return None
            log.info("peer trust store now holds %d certificates", roots.count(b"BEGIN CERT"))
            return self._config()
        except Exception:
            log.exception("trust fetch failed")
            raise

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self._config(), self.fetch,
                                                   require_client_authentication=True)


def serve_peer(servicer: PeerServicer, trust: DynamicTrust, listen: str, max_message: int,
               metrics: Registry) -> tuple[grpc.Server, int]:
    """Start the mutual-TLS peer server; returns it and the bound port."""
    server = grpc.server(ThreadPoolExecutor(32, thread_name_prefix="castore-peer"),
                         options=channel_options(max_message), maximum_concurrent_rpcs=128,
                         interceptors=[_Latency(metrics)])
    ppg.add_PeerServicer_to_server(servicer, server)
    port = server.add_secure_port(listen, trust.credentials())
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    server.start()
    return server, port


def serve_enrol(servicer: EnrolServicer, identity: Identity, host: str, port: int
                ) -> tuple[grpc.Server, int]:
    """Start the enrolment server (server-side TLS only) on host:port (0: any free port)."""
    server = grpc.server(ThreadPoolExecutor(4, thread_name_prefix="castore-enrol"),
                         options=[("grpc.max_receive_message_length", 1 << 20)],
                         maximum_concurrent_rpcs=16)
    ppg.add_EnrolServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)])
    bound = server.add_secure_port(f"{host}:{port}", creds)
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, bound
