"""The drive's commands: mount (a daemon serving the drive, in the foreground) and umount."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from castore.errors import UsageError


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("mount", parents=[common],
                       help="mount the drive at DIR: runs this peer's daemon in the "
                            "foreground (same as 'castore daemon --mount DIR')")
    p.add_argument("dir", metavar="DIR")
    try:
        from castore.cli.cluster import add_daemon_options
        add_daemon_options(p)
    except ImportError:  # pragma: no cover - a build without cluster commands
        pass
    p.set_defaults(run=cmd_mount)
    p = sub.add_parser("umount", parents=[common],
                       help="unmount the drive at DIR; the daemon serving it stops")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long to wait for the daemon to let go (default 30)")
    p.set_defaults(run=cmd_umount)


def cmd_mount(ctx: Any) -> int:
    from castore.cli.repo_cmds import cmd_daemon
    ctx.args.mount = ctx.args.dir
    return int(cmd_daemon(ctx))


def _owner_pid(ctx: Any, mountpoint: str) -> int | None:
    """The pid of this repo's daemon if it serves the drive at mountpoint."""
    try:
        state = json.loads(ctx.config.state_path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("mount") != mountpoint:
        return None
    pid = state.get("pid")
    return pid if isinstance(pid, int) else None


def _gone(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def cmd_umount(ctx: Any) -> int:
    from castore import mounts     # lazily: every command builds this parser
    mp = os.path.realpath(ctx.args.dir) if os.path.exists(ctx.args.dir) else \
        os.path.abspath(ctx.args.dir)
    entry = mounts.find(mp)
    if entry is None:
        raise UsageError(f"no drive is mounted at {mp}")
    if not entry.ours:
        raise mounts.MountError(f"{mp} is a {entry.fstype} mount, not a castore drive")
    how = ""
    pid = _owner_pid(ctx, entry.mountpoint)
    if pid is not None and not _gone(pid):
        from castore.rpc.client import RemoteRepo, daemon_running
        if daemon_running(ctx.config):
            with RemoteRepo(ctx.config) as remote:
                remote.shutdown()              # the daemon unmounts, then exits
            deadline = time.monotonic() + ctx.args.timeout
            while time.monotonic() < deadline and mounts.find(mp) is not None:
                time.sleep(0.05)
            if mounts.find(mp) is None:
                how = "the daemon stopped and unmounted it"
    if not how:
        how = mounts.unmount(mp)              # its daemon, if alive, sees the loop end
    ctx.emit({"mountpoint": mp, "result": how}, f"unmounted {mp} ({how})")
    return 0
