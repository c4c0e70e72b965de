"""File commands: add, cat, get, ls, stat, rm, mv, mkdir."""
from __future__ import annotations

import argparse
import os
import stat as st
import sys
import time
from typing import Any

from castore.cli.progress import Bar
from castore.errors import UsageError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("add", parents=[common], help="add local files; prints content ids")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("-r", "--recursive", action="store_true", help="add directories")
    p.add_argument("--to", default="/", metavar="DIR", help="namespace directory (default /)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--wait", action="store_true", help="return once W = min(2, R_eff) "
                   "peers hold the data (exit 5 if that is not confirmed in time)")
    p.add_argument("--wait-timeout", type=float, default=60.0, metavar="SECONDS")
    p.set_defaults(run=cmd_add)
    p = sub.add_parser("cat", parents=[common], help="write a file's bytes to stdout")
    p.add_argument("target", metavar="ID|PATH")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--length", type=int, default=None)
    p.set_defaults(run=cmd_cat)
    p = sub.add_parser("get", parents=[common], help="copy a file or tree out to DEST")
    p.add_argument("target", metavar="ID|PATH")
    p.add_argument("dest", metavar="DEST")
    p.set_defaults(run=cmd_get)
    p = sub.add_parser("ls", parents=[common], help="list a directory")
    p.add_argument("path", nargs="?", default="/")
    p.set_defaults(run=cmd_ls)
    p = sub.add_parser("stat", parents=[common], help="show a path's metadata")
    p.add_argument("path")
    p.set_defaults(run=cmd_stat)
    p = sub.add_parser("rm", parents=[common], help="remove a path")
    p.add_argument("path")
    p.add_argument("-r", "--recursive", action="store_true")
    p.set_defaults(run=cmd_rm)
    p = sub.add_parser("mv", parents=[common], help="rename or move a path")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(run=cmd_mv)
    p = sub.add_parser("mkdir", parents=[common], help="make a directory")
    p.add_argument("path")
    p.add_argument("-p", "--parents", action="store_true")
    p.set_defaults(run=cmd_mkdir)


def cmd_add(ctx: Any) -> int:
    args = ctx.args
    bar = Bar("add", ctx.progress)
    failed = 0
    started = time.monotonic()
    count = total = 0
    contents: list[str] = []
    with ctx.api() as api:
        groups = api.add_paths_batches(args.paths, args.to, args.recursive,
                                       lambda f, b, tf, tb: bar.update(f, tf, b, tb))
        for group in groups:
            bar.finish()
            for r in group:
                if r.error:
                    failed += 1
                    print(f"castore: error: {r.error}", file=sys.stderr)
                    continue
                count += 1
                total += r.size
                if r.kind != "file":
                    continue
                if ctx.json:
                    ctx.emit(r)
                else:
                    print(f"added {r.content} {r.path}")
            sys.stdout.flush()        # a printed line means a durable commit
            if args.wait:
                contents += [r.content for r in group if not r.error and r.content]
        if args.wait and not failed:
            _wait_replicated(ctx, api, contents, args.wait_timeout)
    bar.finish()
    if not ctx.json and ctx.progress:
        secs = time.monotonic() - started
        print(f"added {count} items, {total} bytes in {secs:.2f} s", file=sys.stderr)
    return 1 if failed else 0


def _wait_replicated(ctx: Any, api: Any, contents: list[str], timeout: float) -> None:
    """add --wait: block until W peers hold everything added; a timeout is indeterminate."""
    from castore.errors import PeerUnavailableError
    from castore.rpc.cluster_api import wait_durable
    ok, w, low, message = wait_durable(api, sorted(set(contents)), timeout)
    if not ok:
        raise PeerUnavailableError(f"add --wait: {message or 'not confirmed in time'} "
                                   "(committed locally; replication continues)")
    if not ctx.json and ctx.progress:
        print(f"durable on {low} peer(s) (W = {w})", file=sys.stderr)


def cmd_cat(ctx: Any) -> int:
    out = sys.stdout.buffer
    with ctx.api() as api:
        for piece in api.read(ctx.args.target, ctx.args.offset, ctx.args.length):
            out.write(piece)
    out.flush()
    return 0


def cmd_get(ctx: Any) -> int:
    with ctx.api() as api:
        target = ctx.args.target
        entry = None if _is_id(target) else api.stat(target)
        if entry is not None and entry.kind == "dir":
            count = _get_tree(api, entry, ctx.args.dest)
        elif entry is not None and entry.kind == "symlink":
            os.symlink(entry.target, ctx.args.dest)
            count = 1
        else:
            _get_file(api, target, ctx.args.dest, entry)
            count = 1
    ctx.emit({"target": target, "dest": ctx.args.dest, "items": count},
             f"saved {target} to {ctx.args.dest}")
    return 0


def _is_id(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _get_file(api: Any, target: str, dest: str, entry: Any) -> None:
    if os.path.isdir(dest):
        dest = os.path.join(dest, os.path.basename(target.rstrip("/")) or "content")
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: no such directory")
    tmp = f"{dest}.castore-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for piece in api.read(target):
                f.write(piece)
        if entry is not None:
            os.chmod(tmp, entry.mode & 0o7777)
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns))
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _get_tree(api: Any, entry: Any, dest: str) -> int:
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise UsageError(f"{dest} exists and is not a directory")
    os.makedirs(dest, exist_ok=True)
    count = 1
    for child in api.listdir(entry.path):
        target = os.path.join(dest, child.name)
        if child.kind == "dir":
            count += _get_tree(api, child, target)
        elif child.kind == "symlink":
            if os.path.lexists(target):
                os.unlink(target)
            os.symlink(child.target, target)
            count += 1
        else:
            _get_file(api, child.path, target, child)
            count += 1
    os.chmod(dest, entry.mode & 0o7777)
    os.utime(dest, ns=(entry.mtime_ns, entry.mtime_ns))
    return count


def _mode_text(kind: str, mode: int) -> str:
    prefix = {"dir": st.S_IFDIR, "symlink": st.S_IFLNK}.get(kind, st.S_IFREG)
    return st.filemode(prefix | mode)


def _line(e: Any) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
    name = e.name + ("/" if e.kind == "dir" else "") + (f" -> {e.target}" if e.target else "")
    return f"{_mode_text(e.kind, e.mode)} {e.size:>12} {when} {name}"


def cmd_ls(ctx: Any) -> int:
    with ctx.api() as api:
        entries = api.listdir(ctx.args.path)
    if ctx.json:
        ctx.emit(entries)
    else:
        for e in entries:
            print(_line(e))
    return 0


def cmd_stat(ctx: Any) -> int:
    with ctx.api() as api:
        e = api.stat(ctx.args.path)
    if ctx.json:
        ctx.emit(e)
        return 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.mtime_ns / 1e9))
    rows = [("path", e.path), ("kind", e.kind), ("size", e.size),
            ("mode", f"{_mode_text(e.kind, e.mode)} ({e.mode:o})"), ("mtime", when),
            ("content", e.content or "-"), ("chunks", e.chunks), ("versions", e.versions),
            ("node", e.node)]
    if e.target:
        rows.append(("target", e.target))
    for k, v in sorted(e.xattrs.items()):
        rows.append((f"xattr {k}", v.decode("utf-8", errors="backslashreplace")))
    print("\n".join(f"{k + ':':<10} {v}" for k, v in rows))
    return 0


def cmd_rm(ctx: Any) -> int:
    with ctx.api() as api:
        n = api.remove(ctx.args.path, ctx.args.recursive)
    ctx.emit({"path": ctx.args.path, "removed": n}, None)
    return 0


def cmd_mv(ctx: Any) -> int:
    with ctx.api() as api:
        e = api.rename(ctx.args.src, ctx.args.dst)
    ctx.emit(e, None)
    return 0


def cmd_mkdir(ctx: Any) -> int:
    with ctx.api() as api:
        e = api.mkdir(ctx.args.path, ctx.args.parents)
    ctx.emit(e, None)
    return 0
