"""protobuf <-> domain values for the client API."""
from __future__ import annotations

from castore._proto import castore_pb2 as pb
from castore.results import AddResult, Entry, VerifyReport


def entry_to_pb(e: Entry) -> pb.Entry:
    return pb.Entry(path=e.path, name=e.name, kind=e.kind, size=e.size, mode=e.mode,
                    mtime_ns=e.mtime_ns, content=e.content, chunks=e.chunks,
                    versions=e.versions, target=e.target, node=e.node, xattrs=e.xattrs)


def entry_from_pb(m: pb.Entry) -> Entry:
    return Entry(path=m.path, name=m.name, kind=m.kind, size=m.size, mode=m.mode,
                 mtime_ns=m.mtime_ns, content=m.content, chunks=m.chunks, versions=m.versions,
                 target=m.target, node=m.node, xattrs=dict(m.xattrs))


def result_to_pb(r: AddResult) -> pb.AddResult:
    return pb.AddResult(path=r.path, content=r.content, size=r.size, new_chunks=r.new_chunks,
                        kind=r.kind, error=r.error)


def result_from_pb(m: pb.AddResult) -> AddResult:
    return AddResult(path=m.path, content=m.content, size=m.size, new_chunks=m.new_chunks,
                     kind=m.kind, error=m.error)


def report_to_pb(r: VerifyReport) -> pb.VerifyReport:
    return pb.VerifyReport(chunks=r.chunks, bytes=r.bytes, manifests=r.manifests,
                           corrupt=r.corrupt, missing=r.missing)


def report_from_pb(m: pb.VerifyReport) -> VerifyReport:
    return VerifyReport(chunks=m.chunks, bytes=m.bytes, manifests=m.manifests,
                        corrupt=list(m.corrupt), missing=list(m.missing))
