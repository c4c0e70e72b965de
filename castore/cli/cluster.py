"""Cluster commands: invite, peers, repair (all served by the running daemon)."""
from __future__ import annotations

import argparse
from typing import Any

from castore.errors import CastoreError, PeerUnavailableError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("invite", parents=[common],
                       help="print a join token for a new peer (castore daemon --token T)")
    p.set_defaults(run=cmd_invite)
    p = sub.add_parser("peers", parents=[common],
                       help="list cluster members: state, address, zone, capacity, used")
    p.set_defaults(run=cmd_peers)
    p = sub.add_parser("repair", parents=[common],
                       help="start a repair pass now (restore R_eff copies, rebalance)")
    p.add_argument("--wait", action="store_true", help="wait until it is done")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    p.set_defaults(run=cmd_repair)


def add_daemon_options(p: argparse.ArgumentParser) -> None:
    """Cluster flags of `castore daemon` (registered by cli/repo_cmds.py)."""
    g = p.add_argument_group("cluster")
    g.add_argument("--listen", metavar="HOST:PORT", help="serve peers here (mutual TLS); "
                   "without it the daemon is a single peer")
    g.add_argument("--join", metavar="HOST:PORT", help="a member to join through")
    g.add_argument("--token", help="join token printed by 'castore invite' on a member")
    g.add_argument("--zone", help="failure domain (default: this machine's hostname)")
    g.add_argument("--capacity", type=int, metavar="BYTES", help="space offered (default: "
                   "the disk's size)")
    g.add_argument("--redundancy", type=int, metavar="R",
                   help="copies of every chunk, for a new cluster (default 3)")
    g.add_argument("--down-out-interval", type=float, metavar="SECONDS",
                   help="how long a peer may be dead before its data is copied elsewhere "
                   "(default 600)")
    g.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")


def daemon_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k, None) for k in ("listen", "join", "token", "zone", "capacity",
                                                 "redundancy", "down_out_interval", "metrics")}


def _remote(ctx: Any) -> Any:
    from castore.rpc.client import RemoteRepo, daemon_running
    if not daemon_running(ctx.config):
        raise PeerUnavailableError(f"no castore daemon is running on {ctx.config.home}")
    return RemoteRepo(ctx.config)


def cmd_invite(ctx: Any) -> int:
    from castore._proto import castore_pb2 as pb
    from castore.rpc.cluster_api import call
    with _remote(ctx) as remote:
        reply = call(remote, "invite", "Invite", pb.Empty(), ctx.config.rpc_timeout)
    ctx.emit({"token": reply.token}, reply.token)
    return 0


def cmd_peers(ctx: Any) -> int:
    from castore._proto import castore_pb2 as pb
    from castore.rpc.cluster_api import call
    with _remote(ctx) as remote:
        reply = call(remote, "peers", "Peers", pb.Empty(), ctx.config.rpc_timeout)
    rows = [{"peer_id": p.peer_id, "addr": p.addr, "zone": p.zone, "state": p.state,
             "capacity": p.capacity, "used": p.used, "rejected": p.rejected,
             "quarantined": p.quarantined, "self": p.self} for p in reply.peers]
    if ctx.json:
        ctx.emit({"peers": rows, "redundancy": reply.redundancy,
                  "redundancy_effective": reply.redundancy_effective})
        return 0
    print(f"{'PEER':<12} {'STATE':<8} {'ADDRESS':<22} {'ZONE':<14} {'CAPACITY':>14} "
          f"{'USED':>12}")
    for r in rows:
        flag = " (this peer)" if r["self"] else (" quarantined" if r["quarantined"] else "")
        print(f"{r['peer_id'][:12]:<12} {r['state']:<8} {r['addr']:<22} {r['zone'][:14]:<14} "
              f"{r['capacity']:>14} {r['used']:>12}{flag}")
    print(f"R={reply.redundancy} R_eff={reply.redundancy_effective}")
    return 0


def cmd_repair(ctx: Any) -> int:
    from castore._proto import castore_pb2 as pb
    from castore.rpc.cluster_api import call
    with _remote(ctx) as remote:
        reply = call(remote, "repair", "Repair",
                     pb.RepairRequest(wait=ctx.args.wait, timeout=ctx.args.timeout),
                     ctx.args.timeout + 30)
    out = {"done": reply.done, "under_replicated": reply.under_replicated,
           "transfers": reply.transfers, "dropped": reply.dropped,
           "seconds": round(reply.seconds, 3)}
    if not ctx.args.wait:
        ctx.emit({"started": True}, "repair started")
        return 0
    ctx.emit(out, f"repair {'done' if reply.done else 'NOT done (timed out)'}: "
                  f"{reply.transfers} transfers, {reply.dropped} extra copies dropped, "
                  f"{reply.under_replicated} under-replicated, {reply.seconds:.1f} s")
    if not reply.done:
        raise CastoreError("repair did not finish before the timeout")
    return 0
