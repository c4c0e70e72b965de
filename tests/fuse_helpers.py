"""Helpers for tests of the drive on real FUSE mounts (a plain module: test modules import it).

Each Drive runs `castore daemon --home HOME --mount DIR` (or `castore mount`) as a subprocess,
waits until the mount answers, and on the way out stops the daemon by PID (SIGTERM, then
SIGKILL after a timeout) and unmounts with fusermount3 -u, then -uz if busy. Nothing is ever
found or killed by name, and only the mountpoints made here are unmounted.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from castore import mounts
from daemon_helpers import CASTORE  # the entry point of the interpreter running the tests


START_TIMEOUT = 30.0        # seconds for a daemon to mount (this machine is often busy)
STOP_TIMEOUT = 20.0


def fuse_missing() -> str | None:
    """Why FUSE tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3"
    if ctypes.util.find_library("fuse3") is None:
        return "no libfuse3"
    return None


# Not a skip: CI runs as root with /dev/fuse and installs libfuse3 (./dev setup), so a missing
# piece is a broken setup and must fail loudly. Run by hand elsewhere with -m 'not fuse'.
needs_fuse = pytest.mark.fuse


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    out.setdefault("CASTORE_LOG", "WARNING")
    out.update(extra or {})
    return out


def castore(*args: str | os.PathLike[str], home: Path | None = None, check: bool = True,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    argv = [os.fspath(a) for a in args]
    if home is not None:
        argv[1:1] = ["--home", os.fspath(home)]
    proc = subprocess.run(CASTORE + argv, capture_output=True, text=True, env=env(),
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"castore {' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


_live: dict[int, subprocess.Popen[Any]] = {}
_mountpoints: set[str] = set()


def force_unmount(mountpoint: str) -> None:
    """Unmount a drive started by these helpers, however it was left."""
    for args in (["-u"], ["-u", "-z"]):
        if mounts.find(mountpoint) is None:
            return
        subprocess.run(["fusermount3", *args, mountpoint], capture_output=True, timeout=20)


def _cleanup_everything() -> None:
    for pid, proc in list(_live.items()):
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        _live.pop(pid, None)
    for mp in list(_mountpoints):
        force_unmount(mp)


atexit.register(_cleanup_everything)


class Drive:
    """One daemon with the drive mounted."""

    def __init__(self, root: Path, command: Sequence[str] = ("daemon", "--mount")) -> None:
        self.root = root
        self.home = root / "home"
        self.mnt = root / "mnt"
        self.log = root / "daemon.log"
        self.command = tuple(command)
        self.proc: subprocess.Popen[Any] | None = None
        self._log_fh: IO[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT) -> Drive:
        self.root.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log, "ab")
        argv = [*CASTORE, self.command[0], "--home", str(self.home), *self.command[1:],
                str(self.mnt)]
        self.proc = subprocess.Popen(argv, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     env=env(), start_new_session=True)
        _live[self.proc.pid] = self.proc
        _mountpoints.add(str(self.mnt))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited {self.proc.returncode} before "
                                     f"mounting:\n{self.log_text()}")
            try:
                if mounts.state(str(self.mnt)) == "live":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the drive did not mount within {timeout} s:\n{self.log_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def send(self, sig: int) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """The daemon's exit code, or None if it is still running after timeout."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop by PID: sig, then SIGKILL after timeout. Returns the exit code of the first
        signal (None if SIGKILL was needed). Always leaves the mountpoint unmounted."""
        rc: int | None = None
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, sig)
            rc = self.wait(timeout)
            if rc is None:
                self.proc.kill()
                self.proc.wait(10)
            _live.pop(self.proc.pid, None)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        force_unmount(str(self.mnt))
        return rc

    def kill(self) -> None:
        """SIGKILL the daemon and leave its mount stale (the caller cleans up)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        _live.pop(self.proc.pid, None)

    def rss(self) -> int:
        """Resident set size of the daemon, in bytes."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def path(self, *parts: str) -> Path:
        return self.mnt.joinpath(*parts)


@contextmanager
def drive(root: Path, command: Sequence[str] = ("daemon", "--mount")) -> Iterator[Drive]:
    d = Drive(root, command)
    try:
        yield d.start()
    finally:
        d.stop()


def run(argv: Sequence[str | os.PathLike[str]], cwd: str | os.PathLike[str] | None = None,
        timeout: float = 120.0, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run an ordinary program; fail the test with its output if it fails."""
    proc = subprocess.run([os.fspath(a) for a in argv], cwd=cwd, capture_output=True,
                          timeout=timeout, input=input)
    out = subprocess.CompletedProcess(proc.args, proc.returncode,
                                      proc.stdout.decode(errors="replace"),
                                      proc.stderr.decode(errors="replace"))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def oserror(fn: Any, *args: Any) -> int:
    """The errno fn(*args) fails with (0 if it does not fail)."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(src: Path, dst: Path, flags: int) -> int:
    """renameat2(2) through libc; returns 0 or the errno."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    return 0 if rc == 0 else ctypes.get_errno()


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3")
        return True
    except OSError:
        return False


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
