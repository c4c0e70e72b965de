"""The kernel's view of castore drives: finding a mountpoint in /proc/self/mountinfo, telling a
live drive from a stale one (its daemon died), unmounting with fusermount3, and raising the
kernel readahead of a mount. Imports no FUSE binding, so the CLI can use it without libfuse.

Only castore's own mounts (file system type fuse.castore) are ever unmounted here; other
programs' FUSE mounts on the machine are left alone.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass

from castore.errors import CastoreError

log = logging.getLogger(__name__)

FSTYPE = "fuse.castore"          # what castore mounts show as in /proc/mounts
FUSERMOUNT_TIMEOUT = 10.0        # seconds


class MountError(CastoreError):
    """A drive could not be mounted or unmounted (busy, not a castore mount, no fusermount3)."""

    exit_code = 2


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str

    @property
    def ours(self) -> bool:
        return self.fstype == FSTYPE


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def fuse_mounts() -> list[MountEntry]:
    """Every FUSE mount this process can see, in mount order."""
    entries = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.readlines()
    except OSError:
        return []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        fstype = tail[0]
        if fstype == "fuse" or fstype.startswith("fuse."):
            entries.append(MountEntry(_unescape(fields[4]), fstype, _unescape(tail[1])))
    return entries


def find(mountpoint: str) -> MountEntry | None:
    """The topmost FUSE mount at mountpoint, or None."""
    target = os.path.realpath(mountpoint) if os.path.exists(mountpoint) else \
        os.path.abspath(mountpoint)
    found = None
    for entry in fuse_mounts():
        if entry.mountpoint in (target, os.path.abspath(mountpoint)):
            found = entry
    return found


def state(mountpoint: str) -> str:
    """'absent', 'live' or 'stale' (mounted, but its daemon is gone: ENOTCONN).

    statvfs always reaches the daemon, unlike stat, which the kernel may answer from its
    attribute cache for a while after the daemon died."""
    if find(mountpoint) is None:
        return "absent"
    try:
        os.statvfs(mountpoint)
        return "live"
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return "stale"
        raise


def _fusermount(args: list[str], mountpoint: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("fusermount3")
    if exe is None:
        raise MountError("fusermount3 is not installed (Debian/Ubuntu: apt install fuse3)")
    try:
        return subprocess.run([exe, *args, mountpoint], capture_output=True, text=True,
                              timeout=FUSERMOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([exe, *args, mountpoint], 1, "",
                                           f"fusermount3 {' '.join(args)} timed out")


def unmount(mountpoint: str, lazy_if_busy: bool = True) -> str:
    """Unmount a castore drive: fusermount3 -u, then -uz (lazy) when it is busy. Returns how
    it went ('unmounted', 'lazily unmounted', 'not mounted'). Raises MountError for a mount
    that is not castore's, or when both attempts fail."""
    entry = find(mountpoint)
    if entry is None:
        return "not mounted"
    if not entry.ours:
        raise MountError(f"{mountpoint} is a {entry.fstype} mount, not a castore drive: "
                         "leaving it alone")
    first = _fusermount(["-u"], entry.mountpoint)
    if first.returncode == 0:
        return "unmounted"
    if not lazy_if_busy:
        raise MountError(f"cannot unmount {mountpoint}: {first.stderr.strip()}")
    second = _fusermount(["-u", "-z"], entry.mountpoint)
    if second.returncode == 0:
        log.info("%s was busy (%s): detached lazily", mountpoint, first.stderr.strip())
        return "lazily unmounted"
    raise MountError(f"cannot unmount {mountpoint}: {second.stderr.strip() or first.stderr}")


def clear_stale(mountpoint: str) -> bool:
    """Before mounting at mountpoint: unmount a stale castore drive left there by a daemon
    that died. True if one was cleaned. A live mount, or anyone else's mount, raises
    MountError."""
    entry = find(mountpoint)
    if entry is None:
        return False
    if not entry.ours:
        raise MountError(f"{mountpoint} already has a {entry.fstype} mount on it")
    now = state(mountpoint)
    if now == "live":
        raise MountError(f"a castore drive is already mounted at {mountpoint}")
    if now == "absent":
        return False
    how = unmount(mountpoint)
    log.warning("cleaned up a stale castore drive at %s (%s)", mountpoint, how)
    return True


def raise_readahead(mountpoint: str, kib: int = 1024) -> bool:
    """Raise the kernel readahead of the mount's backing device, so sequential reads arrive as
    1 MiB requests instead of 128 KiB. Needs root; False when not allowed."""
    try:
        dev = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
        with open(path, "w") as fh:
            fh.write(str(kib))
        return True
    except OSError as exc:
        log.debug("cannot raise readahead of %s: %s", mountpoint, exc)
        return False
