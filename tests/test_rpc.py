"""The client gRPC service at the wire: a real daemon process, called through the generated
stubs on its UNIX socket (no RemoteRepo), so the status codes and limits are what any client
sees."""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from daemon_helpers import Daemon, running_daemon
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf import descriptor_pool

from castore._proto import castore_pb2 as pb
from castore._proto import castore_pb2_grpc as pbg
from castore.ids import ChunkId

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
CAP = 16 * MiB            # the daemon's default max_message
DEADLINE = 30.0           # every call below has a deadline


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("rpc") / "home") as d:
        yield d
        assert d.alive(), d.log_text()
        assert "Traceback" not in d.log_text(), d.log_text()     # bad calls are not crashes


@pytest.fixture(scope="module")
def channel(daemon: Daemon) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel("unix:" + str(daemon.socket),
                               options=[("grpc.max_receive_message_length", 64 * MiB)])
    try:
        yield ch
    finally:
        ch.close()


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pbg.ClientStub:
    return pbg.ClientStub(channel)


def put(stub: pbg.ClientStub, requests: list[pb.PutRequest]) -> list[pb.AddResult]:
    return [r for event in stub.Put(iter(requests), timeout=DEADLINE) for r in event.results]


def get(stub: pbg.ClientStub, target: str, **kw: int | bool) -> bytes:
    return b"".join(c.data for c in stub.Get(pb.GetRequest(target=target, **kw),
                                             timeout=DEADLINE))


def file_requests(path: str, data: bytes, frame: int = MiB) -> list[pb.PutRequest]:
    reqs = [pb.PutRequest(header=pb.FileHeader(path=path, kind="file", mode=0o644,
                                               mtime_ns=1_600_000_000_123_456_789,
                                               size=len(data)))]
    reqs += [pb.PutRequest(data=data[i:i + frame]) for i in range(0, len(data), frame)]
    return reqs


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_serving(channel: grpc.Channel, stub: pbg.ClientStub) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Status(pb.Empty(), timeout=5).state == "running"


# -- health and reflection ----------------------------------------------------------------
def test_health_check(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "castore.v1.Client"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    err = rpc_error(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.Such"),
                                         timeout=5))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services_and_methods(channel: grpc.Channel) -> None:
    stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = [s.name for s in next(stream).list_services_response.service]
    assert set(names) >= {"castore.v1.Client", "grpc.health.v1.Health",
                          "grpc.reflection.v1alpha.ServerReflection"}, names
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    methods = {m.name for m in pool.FindServiceByName("castore.v1.Client").methods}
    local = {m.name for m in pb.DESCRIPTOR.services_by_name["Client"].methods}
    assert methods == local and {"Put", "Get", "Stat", "Verify"} <= methods


# -- Put and Get --------------------------------------------------------------------------
def test_put_many_small_files_in_one_stream(stub: pbg.ClientStub) -> None:
    rng = random.Random(31)
    files = {f"/small/d{i % 7}/f{i:03d}": rng.randbytes(rng.choice([0, 1, 100, 4096,
                                                                    rng.randrange(40000)]))
             for i in range(300)}
    requests = [r for path, data in files.items() for r in file_requests(path, data)]
    results = put(stub, requests)
    assert [r.path for r in results] == list(files)
    assert all(not r.error and r.kind == "file" for r in results)
    for r in results:
        data = files[r.path]
        assert r.size == len(data)
        if data:
            assert r.content == ChunkId.of(data).hex       # one chunk: named by its chunk
    for path, data in rng.sample(sorted(files.items()), 60):
        assert get(stub, path) == data
    some = next(r for r in results if r.size > 1000)
    assert get(stub, some.content) == files[some.path]
    listing = stub.List(pb.PathRequest(path="/small/d3"), timeout=DEADLINE).entries
    assert sorted(e.name for e in listing) == sorted(
        p.rsplit("/", 1)[1] for p in files if p.startswith("/small/d3/"))


@pytest.fixture(scope="module")
def large(stub: pbg.ClientStub) -> tuple[str, bytes]:
    data = random.Random(12).randbytes(12 * MiB)
    (result,) = put(stub, file_requests("/large/twelve", data, frame=MiB))
    assert not result.error and result.size == len(data)
    return result.content, data


def test_put_large_file_in_1mib_frames(stub: pbg.ClientStub, large: tuple[str, bytes]) -> None:
    content, data = large
    entry = stub.Stat(pb.PathRequest(path="/large/twelve"), timeout=DEADLINE)
    assert entry.size == len(data) and entry.content == content and entry.chunks >= 4
    assert entry.mtime_ns == 1_600_000_000_123_456_789
    frames = [c.data for c in stub.Get(pb.GetRequest(target="/large/twelve"),
                                       timeout=DEADLINE)]
    assert b"".join(frames) == data
    assert max(len(f) for f in frames) <= MiB            # the daemon streams 1 MiB frames
    assert get(stub, content) == data
    assert get(stub, "/large/twelve", offset=5 * MiB + 3, length=MiB + 7,
               has_length=True) == data[5 * MiB + 3:6 * MiB + 10]


# -- bad input ----------------------------------------------------------------------------
def _paths_under(stub: pbg.ClientStub, path: str) -> list[str]:
    try:
        return [e.path for e in stub.List(pb.PathRequest(path=path), timeout=DEADLINE).entries]
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return []


@pytest.mark.parametrize("case", ["data-first", "unknown-kind"])
def test_malformed_put_stream_is_invalid_argument(stub: pbg.ClientStub, channel: grpc.Channel,
                                                  case: str) -> None:
    good = random.Random(5).randbytes(3000)
    if case == "data-first":
        requests = [pb.PutRequest(data=b"orphan bytes")] + file_requests(f"/bad-{case}/a", good)
    else:
        requests = file_requests(f"/bad-{case}/a", good) + file_requests(
            f"/bad-{case}/b", good) + [pb.PutRequest(header=pb.FileHeader(
                path=f"/bad-{case}/c", kind="fifo"))]
    reported: list[str] = []
    with pytest.raises(grpc.RpcError) as info:
        for event in stub.Put(iter(requests), timeout=DEADLINE):
            reported += [r.path for r in event.results if not r.error]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert ("header" if case == "data-first" else "fifo") in info.value.details()
    # Consistent: exactly what was reported exists; the store verifies clean.
    assert sorted(_paths_under(stub, f"/bad-{case}")) == sorted(reported)
    report = [e for e in stub.Verify(pb.Empty(), timeout=DEADLINE) if e.HasField("report")]
    assert report and not report[-1].report.corrupt and not report[-1].report.missing
    assert_serving(channel, stub)


def test_oversized_message_is_refused_and_the_daemon_serves_on(
        stub: pbg.ClientStub, channel: grpc.Channel, large: tuple[str, bytes]) -> None:
    started = time.monotonic()
    err = rpc_error(lambda: put(stub, [pb.PutRequest(header=pb.FileHeader(
        path="/huge", size=CAP + MiB)), pb.PutRequest(data=bytes(CAP + MiB))]))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    err = rpc_error(lambda: stub.Mkdir(pb.MkdirRequest(path="/" + "x" * (CAP + 10)),
                                       timeout=DEADLINE))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert time.monotonic() - started < 10
    assert_serving(channel, stub)
    assert _paths_under(stub, "/huge") == []
    content, data = large
    assert get(stub, content) == data
    (ok,) = put(stub, file_requests("/after-huge", b"still writing"))
    assert not ok.error and get(stub, "/after-huge") == b"still writing"


def test_tiny_deadline_on_a_large_get(stub: pbg.ClientStub, channel: grpc.Channel,
                                      large: tuple[str, bytes]) -> None:
    started = time.monotonic()
    err = rpc_error(lambda: b"".join(c.data for c in stub.Get(
        pb.GetRequest(target="/large/twelve"), timeout=0.001)))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.0
    # A slow reader past its deadline is cut off too, promptly.
    started = time.monotonic()
    got = 0

    def slow() -> None:
        nonlocal got
        for c in stub.Get(pb.GetRequest(target="/large/twelve"), timeout=0.3):
            got += len(c.data)
            time.sleep(0.1)
    err = rpc_error(slow)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    assert got < len(large[1])
    assert_serving(channel, stub)


def test_unknown_path_or_id_is_not_found(stub: pbg.ClientStub) -> None:
    calls = [lambda: stub.Stat(pb.PathRequest(path="/no/such"), timeout=DEADLINE),
             lambda: stub.List(pb.PathRequest(path="/no/such"), timeout=DEADLINE),
             lambda: get(stub, "/no/such"),
             lambda: get(stub, "ab" * 32),
             lambda: stub.Remove(pb.RemoveRequest(path="/no/such"), timeout=DEADLINE),
             lambda: stub.Rename(pb.RenameRequest(src="/no/such", dst="/x"),
                                 timeout=DEADLINE)]
    for call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        meta = dict(err.trailing_metadata() or ())
        assert meta.get("castore-error") in ("PathNotFoundError", "ChunkNotFoundError")


class _Refused(grpc.RpcError):
    """A failed call as grpcio reports it, for the error mapping alone."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def test_resource_exhausted_is_disk_full_only_when_the_daemon_says_so() -> None:
    from castore.errors import LimitError, StorageFullError
    from castore.rpc.errors import ERROR_KEY, from_rpc_error
    tagged = from_rpc_error(_Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "disk full",
                                     ((ERROR_KEY, "StorageFullError"),)), "put")
    assert isinstance(tagged, StorageFullError) and tagged.exit_code == 7
    oversized = from_rpc_error(_Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        "Received message larger than max"), "put")
    assert isinstance(oversized, LimitError) and not isinstance(oversized, StorageFullError)
    assert oversized.exit_code == 2 and "larger than max" in str(oversized)
