"""Repo-level commands: init, daemon, status, verify."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from castore.cli.progress import Bar


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("init", parents=[common], help="create a repo")
    p.set_defaults(run=cmd_init)
    p = sub.add_parser("daemon", parents=[common], help="run this peer's daemon")
    p.add_argument("--mount", metavar="DIR", help="also mount the drive at DIR")
    from castore.cli.cluster import add_daemon_options
    add_daemon_options(p)
    p.set_defaults(run=cmd_daemon)
    p = sub.add_parser("status", parents=[common], help="daemon state and repo statistics")
    p.set_defaults(run=cmd_status)
    p = sub.add_parser("verify", parents=[common],
                       help="re-hash every local chunk; exit 1 if anything is corrupt")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_verify)


def cmd_init(ctx: Any) -> int:
    from castore.repo import Repo
    existed = (ctx.config.store_path / "data.mdb").exists()
    with Repo.init(ctx.config) as repo:
        replica = repo.replica.hex()
    ctx.emit({"home": str(ctx.config.home), "replica": replica, "created": not existed},
             f"{'reusing' if existed else 'initialized'} castore repo at {ctx.config.home}")
    return 0


def cmd_daemon(ctx: Any) -> int:
    from castore.cli.cluster import daemon_overrides
    from castore.node import run_daemon
    return run_daemon(ctx.config.with_(**{k: v for k, v in daemon_overrides(ctx.args).items()
                                          if v is not None}), ctx.args.mount)


def cmd_status(ctx: Any) -> int:
    from castore.rpc.client import RemoteRepo, daemon_running
    if daemon_running(ctx.config):
        with RemoteRepo(ctx.config) as remote:
            reply = remote.status()
        stats: dict[str, Any] = dict(reply.stats)
        out = {"daemon": "running", "pid": reply.pid, "home": reply.home,
               "uptime": round(reply.uptime, 1), "version": reply.version,
               "mount": reply.mount, "redundancy": reply.redundancy,
               "redundancy_effective": reply.redundancy_effective,
               "warnings": list(reply.warnings), "stats": stats}
        if reply.peer_id:
            out["cluster"] = {"peer_id": reply.peer_id, "listen": reply.listen,
                              "live_peers": reply.live_peers, "members": reply.members,
                              "under_replicated": reply.under_replicated,
                              "repair_pending": reply.repair_pending,
                              "repair_done": reply.repair_done,
                              "replication_queue": reply.replication_queue}
    else:
        from castore.repo import Repo
        with Repo.open(ctx.config) as repo:
            stats = repo.stats()
        out = {"daemon": "stopped", "home": str(ctx.config.home), "stats": stats,
               "warnings": ["no daemon running: the repo was read directly"]}
    if ctx.json:
        ctx.emit(out)
        return 0
    lines = [f"daemon:      {out['daemon']}" + (f" (pid {out['pid']}, up {out['uptime']} s)"
                                                  if out["daemon"] == "running" else "")]
    lines.append(f"home:        {out['home']}")
    if out.get("mount"):
        lines.append(f"mount:       {out['mount']}")
    s = out["stats"]
    lines += [f"files:       {s['files']} ({s['dirs']} directories, {s['symlinks']} symlinks)",
              f"logical:     {s['logical_bytes']} bytes",
              f"chunks:      {s['chunks']} ({s['raw_bytes']} bytes raw, "
              f"{s['stored_bytes']} stored)",
              f"dedup:       {s['dedup_ratio']}x   compression: {s['compression_ratio']}x",
              f"on disk:     {s['disk_bytes']} bytes",
              f"chunker:     {s['chunker']}"]
    if "redundancy" in out:
        lines.append(f"redundancy:  R={out['redundancy']} R_eff={out['redundancy_effective']}")
    c = out.get("cluster")
    if c:
        lines += [f"peer:        {c['peer_id'][:16]} on {c['listen']} "
                  f"({c['live_peers']} of {c['members']} members live)",
                  f"replication: {c['replication_queue']} queued, {c['under_replicated']} "
                  f"under-replicated, repair {c['repair_pending']} pending / "
                  f"{c['repair_done']} done"]
    lines += [f"warning:     {w}" for w in out["warnings"]]
    print("\n".join(lines))
    return 0


def cmd_verify(ctx: Any) -> int:
    bar = Bar("verify", ctx.progress)
    started = time.monotonic()
    with ctx.api() as api:
        report = api.verify(lambda r, total: bar.update(r.chunks, total, r.bytes))
    bar.finish()
    out = {"ok": report.ok, "chunks": report.chunks, "bytes": report.bytes,
           "manifests": report.manifests, "corrupt": report.corrupt, "missing": report.missing,
           "seconds": round(time.monotonic() - started, 3)}
    if ctx.json:
        print(json.dumps(out, sort_keys=True))
    else:
        for cid in report.corrupt:
            print(f"corrupt {cid}")
        for cid in report.missing:
            print(f"missing {cid}")
        print(f"verified {report.chunks} chunks ({report.bytes} bytes) and {report.manifests} "
              f"manifests: " + ("ok" if report.ok else
                                f"{len(report.corrupt)} corrupt, {len(report.missing)} missing"))
    return 0 if report.ok else 1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
