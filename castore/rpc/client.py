"""RemoteRepo: the Repo API over the daemon's UNIX socket. Every call has a deadline; gRPC
failures come back as CastoreErrors."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from castore._proto import castore_pb2 as pb
from castore._proto import castore_pb2_grpc as pbg
from castore.config import Config
from castore.errors import PeerUnavailableError, UsageError
from castore.ops import Kind
from castore.results import AddResult, Entry, IngestItem, VerifyReport
from castore.rpc.convert import entry_from_pb, report_from_pb, result_from_pb
from castore.rpc.errors import from_rpc_error
from castore.rpc.options import options

T = TypeVar("T")
PUT_FRAME = 1 << 20
KIND_TEXT = {Kind.FILE: "file", Kind.DIR: "dir", Kind.SYMLINK: "symlink"}


def daemon_running(config: Config, timeout: float = 2.0) -> bool:
    """True if a daemon answers health checks on the repo's socket."""
    if not config.socket_path.exists():
        return False
    with RemoteRepo(config) as remote:
        return remote.serving(timeout)


class RemoteRepo:
    """The subset of Repo the CLI uses, served by a running daemon."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._channel = grpc.insecure_channel("unix:" + str(config.socket_path),
                                              options=options(config.max_message))
        self._stub = pbg.ClientStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def serving(self, timeout: float = 2.0) -> bool:
        """True if a daemon answers health checks on the socket. The connection it opens is
        the one later calls use."""
        try:
            reply = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def __enter__(self) -> RemoteRepo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, what: str, call: Callable[..., T], request: Any) -> T:
        try:
            return call(request, timeout=self.config.rpc_timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, what) from exc

    def _stream(self, what: str, responses: Iterable[T]) -> Iterator[T]:
        try:
            yield from responses
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, what) from exc

    # -- Repo API -------------------------------------------------------------------------
    def add_paths(self, paths: Iterable[str], dest: str = "/", recursive: bool = False,
                  on_progress: Callable[[int, int, int, int], None] | None = None
                  ) -> Iterator[AddResult]:
        for group in self.add_paths_batches(paths, dest, recursive, on_progress):
            yield from group

    def add_paths_batches(self, paths: Iterable[str], dest: str = "/", recursive: bool = False,
                          on_progress: Callable[[int, int, int, int], None] | None = None
                          ) -> Iterator[list[AddResult]]:
        request = pb.AddPathsRequest(paths=[os.path.abspath(p) for p in paths], dest=dest,
                                     recursive=recursive)
        events = self._stub.AddPaths(request, timeout=self.config.stream_timeout)
        yield from self._groups("add", events, on_progress)

    def ingest(self, items: Iterable[IngestItem],
               on_progress: Callable[[int, int, int, int], None] | None = None
               ) -> Iterator[AddResult]:
        """Stream items (with data, chunks or a local source) through one Put call."""
        events = self._stub.Put(_put_requests(items), timeout=self.config.stream_timeout)
        for group in self._groups("put", events, on_progress):
            yield from group

    def _groups(self, what: str, events: Iterable[pb.AddEvent],
                on_progress: Callable[[int, int, int, int], None] | None
                ) -> Iterator[list[AddResult]]:
        for event in self._stream(what, events):
            if on_progress and event.HasField("progress"):
                p = event.progress
                on_progress(p.done, p.bytes, p.total, p.total_bytes)
            if event.results:
                yield [result_from_pb(r) for r in event.results]

    def read(self, target: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        if offset < 0 or (length is not None and length < 0):    # as Repo.read; uint64 on the wire
            raise UsageError("offset and length must not be negative")
        request = pb.GetRequest(target=target, offset=offset, length=length or 0,
                                has_length=length is not None)
        chunks = self._stub.Get(request, timeout=self.config.stream_timeout)
        for c in self._stream(f"read {target}", chunks):
            yield c.data

    def stat(self, path: str) -> Entry:
        return entry_from_pb(self._unary(f"stat {path}", self._stub.Stat,
                                         pb.PathRequest(path=path)))

    def listdir(self, path: str = "/") -> list[Entry]:
        reply = self._unary(f"ls {path}", self._stub.List, pb.PathRequest(path=path))
        return [entry_from_pb(e) for e in reply.entries]

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> Entry:
        return entry_from_pb(self._unary(f"mkdir {path}", self._stub.Mkdir,
                                         pb.MkdirRequest(path=path, parents=parents, mode=mode)))

    def remove(self, path: str, recursive: bool = False) -> int:
        reply = self._unary(f"rm {path}", self._stub.Remove,
                            pb.RemoveRequest(path=path, recursive=recursive))
        return int(reply.removed)

    def rename(self, src: str, dst: str) -> Entry:
        return entry_from_pb(self._unary(f"mv {src}", self._stub.Rename,
                                         pb.RenameRequest(src=src, dst=dst)))

    def status(self) -> pb.StatusReply:
        return self._unary("status", self._stub.Status, pb.Empty())

    def verify(self, on_progress: Callable[[VerifyReport, int], None] | None = None
               ) -> VerifyReport:
        events = self._stub.Verify(pb.Empty(), timeout=self.config.stream_timeout)
        for event in self._stream("verify", events):
            if event.WhichOneof("event") == "report":
                return report_from_pb(event.report)
            if on_progress:
                p = event.progress
                on_progress(VerifyReport(chunks=p.done, bytes=p.bytes), p.total)
        raise PeerUnavailableError("verify: the daemon ended the stream without a report")

    def shutdown(self) -> None:
        self._unary("shutdown", self._stub.Shutdown, pb.Empty())


def _put_requests(items: Iterable[IngestItem]) -> Iterator[pb.PutRequest]:
    for item in items:
        yield pb.PutRequest(header=pb.FileHeader(
            path=item.dest, kind=KIND_TEXT.get(item.kind, "file"), mode=item.mode,
            mtime_ns=item.mtime_ns, size=item.size, target=os.fsdecode(item.target)))
        if item.kind != Kind.FILE:
            continue
        if item.data is not None:
            for i in range(0, len(item.data), PUT_FRAME):
                yield pb.PutRequest(data=item.data[i:i + PUT_FRAME])
        elif item.chunks is not None:
            for c in item.chunks:
                yield pb.PutRequest(data=bytes(c))
        elif item.source is not None:
            with open(item.source, "rb") as f:
                while block := f.read(PUT_FRAME):
                    yield pb.PutRequest(data=block)
