"""The cluster part of the client API (Peers, Invite, Repair, WaitDurable): a mixin of the
client servicer, delegating to the daemon's Cluster (duck-typed: rpc sits below it), and the
client-side calls over a RemoteRepo."""
from __future__ import annotations

from typing import Any

import grpc

from castore._proto import castore_pb2 as pb
from castore.errors import UsageError
from castore.rpc.errors import abort_on_error, from_rpc_error

NOT_CLUSTERED = ("this daemon is not in a cluster (start it with --listen HOST:PORT, and "
                 "--join/--token to join one)")


class ClusterApi:
    """Handlers; `self._cluster` is the Cluster or None, `self._repo` the Repo."""

    _cluster: Any
    _repo: Any

    def _need(self) -> Any:
        if self._cluster is None:
            raise UsageError(NOT_CLUSTERED)
        return self._cluster

    def Peers(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.PeersReply:
        with abort_on_error(context):
            return self._need().peers_reply()

    def Invite(self, request: pb.Empty, context: grpc.ServicerContext) -> pb.InviteReply:
        with abort_on_error(context):
            return pb.InviteReply(token=self._need().invite())

    def Repair(self, request: pb.RepairRequest, context: grpc.ServicerContext
               ) -> pb.RepairReply:
        with abort_on_error(context):
            return self._need().repair(request.wait, request.timeout or 600.0)

    def WaitDurable(self, request: pb.WaitRequest, context: grpc.ServicerContext
                    ) -> pb.WaitReply:
        with abort_on_error(context):
            ok, w, low = self._repo.wait_durable(list(request.contents),
                                                 request.timeout or 60.0)
            msg = "" if ok else (f"indeterminate: only {low} of {w} copies confirmed before "
                                 "the timeout; they may still land")
            return pb.WaitReply(durable=ok, w=w, min_copies=low, message=msg)


def call(remote: Any, what: str, method: str, request: Any, timeout: float) -> Any:
    """One unary call of the cluster API over a RemoteRepo's channel."""
    try:
        return getattr(remote._stub, method)(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc, what) from exc


def wait_durable(api: Any, contents: list[str], timeout: float) -> tuple[bool, int, int, str]:
    """(durable, W, fewest copies, message), through the daemon or a directly opened Repo."""
    if hasattr(api, "_stub"):
        r = call(api, "wait", "WaitDurable", pb.WaitRequest(contents=contents, timeout=timeout),
                 timeout + 10)
        return r.durable, r.w, r.min_copies, r.message
    ok, w, low = api.wait_durable(contents, timeout)
    return ok, w, low, ""
