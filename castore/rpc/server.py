"""The client service: a wire adapter over Repo, served on the repo's UNIX socket (mode 0600)
with gRPC health checking and server reflection. No storage logic here."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from castore import chunking
from castore._proto import castore_pb2 as pb
from castore._proto import castore_pb2_grpc as pbg
from castore.errors import UsageError
from castore.ops import Kind
from castore.repo import SMALL_FILE, Repo
from castore.results import AddResult, IngestItem, VerifyReport
from castore.rpc.cluster_api import ClusterApi
from castore.rpc.convert import entry_to_pb, report_to_pb, result_to_pb
from castore.rpc.errors import abort_on_error
from castore.rpc.options import options

SERVICE = pb.DESCRIPTOR.services_by_name["Client"].full_name
READ_FRAME = 1 << 20
PROGRESS_EVERY = 0.2          # seconds between progress events


class _Progress:
    """Collects progress from ingest callbacks; the handler thread emits it at most every
    PROGRESS_EVERY seconds between results."""

    def __init__(self) -> None:
        self.values = (0, 0, 0, 0)
        self._last = 0.0

    def update(self, files: int, nbytes: int, total_files: int, total_bytes: int) -> None:
        self.values = (files, nbytes, total_files, total_bytes)

    def due(self) -> pb.Progress | None:
        now = time.monotonic()
        if now - self._last < PROGRESS_EVERY:
            return None
        self._last = now
        f, b, tf, tb = self.values
        return pb.Progress(done=f, total=tf, bytes=b, total_bytes=tb)


class ClientServicer(ClusterApi, pbg.ClientServicer):
    """Translate protobuf <-> Repo calls (and cluster calls, see rpc/cluster_api.py)."""

    def __init__(self, repo: Repo, status: Callable[[], pb.StatusReply],
                 shutdown: Callable[[], None], cluster: Any = None) -> None:
        self._repo = repo
        self._cluster = cluster
        self._status = status
        self._shutdown = shutdown

    def AddPaths(self, request: pb.AddPathsRequest, context: grpc.ServicerContext
                 ) -> Iterator[pb.AddEvent]:
        with abort_on_error(context):
            for p in request.paths:
                if not os.path.isabs(p):
                    raise UsageError(f"paths sent to the daemon must be absolute: {p}")
            progress = _Progress()
            results = self._repo.add_paths_batches(list(request.paths), request.dest or "/",
                                                   request.recursive, progress.update)
            yield from _with_progress(results, progress, context)

    def Put(self, request_iterator: Iterator[pb.PutRequest], context: grpc.ServicerContext
            ) -> Iterator[pb.AddEvent]:
        with abort_on_error(context):
            reader = _PutReader(request_iterator)
            progress = _Progress()
            yield from _with_progress(self._repo.ingest_batches(reader.items(), None), progress,
                                      context)

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext
            ) -> Iterator[pb.DataChunk]:
        with abort_on_error(context):
            length = request.length if request.has_length else None
            for piece in self._repo.read(request.target, request.offset, length):
                view = memoryview(piece)
                for i in range(0, len(view), READ_FRAME):
                    yield pb.DataChunk(data=bytes(view[i:i + READ_FRAME]))

    def Stat(self, request: pb.PathRequest, context: grpc.ServicerContext) -> pb.Entry:
        with abort_on_error(context):
            return entry_to_pb(self._repo.stat(request.path))

    def List(self, request: pb.PathRequest, context: grpc.ServicerContext) -> pb.ListReply:
        with abort_on_error(context):
            return pb.ListReply(entries=[entry_to_pb(e) for e in
                                         self._repo.listdir(request.path or "/")])

    def Mkdir(self, request: pb.MkdirRequest, context: grpc.ServicerContext) -> pb.Entry:
        with abort_on_error(context):
            return entry_to_pb(self._repo.mkdir(request.path, request.parents,
                                                request.mode or 0o755))

    def Remove(self, request: pb.RemoveRequest, context: grpc.ServicerContext
               ) -> pb.RemoveReply:
        with abort_on_error(context):
            return pb.RemoveReply(removed=self._repo.remove(request.path, request.recursive))

    def Rename(self, request: pb.RenameRequest, context: grpc.ServicerContext) -> pb.Entry:
        with abort_on_error(context):
            return entry_to_pb(self._repo.rename(request.src, request.dst))

    def Status(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.StatusReply:
        with abort_on_error(context):
            return self._status()

    def Verify(self, request: pb.Empty, context: grpc.ServicerContext
               ) -> Iterator[pb.VerifyEvent]:
        with abort_on_error(context):
            events: list[pb.VerifyEvent] = []
            last = [0.0]

            def progress(report: VerifyReport, total: int) -> None:
                now = time.monotonic()
                if now - last[0] >= PROGRESS_EVERY:
                    last[0] = now
                    events.append(pb.VerifyEvent(progress=pb.Progress(
                        done=report.chunks, total=total, bytes=report.bytes)))
            done = threading.Event()
            result: list[VerifyReport] = []
            failure: list[BaseException] = []

            def run() -> None:
                try:
                    result.append(self._repo.verify(progress))
                except BaseException as exc:  # re-raised in the handler thread
                    failure.append(exc)
                finally:
                    done.set()
            threading.Thread(target=run, name="castore-verify", daemon=True).start()
            while not done.wait(PROGRESS_EVERY):
                while events:
                    yield events.pop(0)
                if not context.is_active():
                    return
            if failure:
                raise failure[0]
            yield pb.VerifyEvent(report=report_to_pb(result[0]))

    def Shutdown(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.Empty:
        threading.Thread(target=self._shutdown, name="castore-shutdown", daemon=True).start()
        return pb.Empty()


def _with_progress(groups: Iterator[list[AddResult]], progress: _Progress,
                   context: grpc.ServicerContext) -> Iterator[pb.AddEvent]:
    for group in groups:
        yield pb.AddEvent(results=[result_to_pb(r) for r in group], progress=progress.due())
        if not context.is_active():
            return


class _PutReader:
    """Turns a Put request stream into IngestItems. Small files are gathered whole; a large
    file becomes a lazy chunk stream, cut as its frames arrive (bounded memory)."""

    def __init__(self, requests: Iterator[pb.PutRequest]) -> None:
        self._requests = iter(requests)
        self._pending: pb.PutRequest | None = None

    def _next(self) -> pb.PutRequest | None:
        if self._pending is not None:
            req, self._pending = self._pending, None
            return req
        return next(self._requests, None)

    def _frames(self) -> Iterator[bytes]:
        while True:
            req = self._next()
            if req is None:
                return
            if req.WhichOneof("item") == "header":
                self._pending = req
                return
            yield req.data

    def _chunks(self) -> Iterator[bytes]:
        cutter = chunking.StreamChunker()
        for frame in self._frames():
            yield from cutter.feed(frame)
        yield from cutter.finish()

    def items(self) -> Iterator[IngestItem]:
        while True:
            req = self._next()
            if req is None:
                return
            if req.WhichOneof("item") != "header":
                raise UsageError("a Put stream must start each file with a header")
            h = req.header
            kind = {"": Kind.FILE, "file": Kind.FILE, "dir": Kind.DIR,
                    "symlink": Kind.SYMLINK}.get(h.kind)
            if kind is None:
                raise UsageError(f"unknown kind {h.kind!r} for {h.path}")
            item = IngestItem(h.path, kind, h.mode or (0o755 if kind == Kind.DIR else 0o644),
                              h.mtime_ns, size=h.size, target=os.fsencode(h.target))
            if kind == Kind.FILE:
                if h.size <= SMALL_FILE:
                    item.data = b"".join(self._frames())
                    item.size = len(item.data)
                else:
                    item.chunks = self._chunks()
            yield item


def serve(repo: Repo, socket_path: str, max_message: int, status: Callable[[], pb.StatusReply],
          shutdown: Callable[[], None], cluster: Any = None
          ) -> tuple[grpc.Server, health.HealthServicer]:
    """Start the client service on a UNIX socket created with mode 0600."""
    server = grpc.server(ThreadPoolExecutor(16, thread_name_prefix="castore-rpc"),
                         options=options(max_message), maximum_concurrent_rpcs=64)
    pbg.add_ClientServicer_to_server(ClientServicer(repo, status, shutdown, cluster), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    old = os.umask(0o177)
    try:
        server.add_insecure_port("unix:" + socket_path)
    finally:
        os.umask(old)
    os.chmod(socket_path, 0o600)
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return server, health_servicer
