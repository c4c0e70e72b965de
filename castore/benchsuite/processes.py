"""Every process and mount the bench starts, so that all of them can be ended however the run
ends (normally, an error, Ctrl-C or SIGTERM).

Each process runs in its own session (so a Ctrl-C on the terminal reaches only the bench, which
then stops them in order) and is ended by its PID: SIGTERM to its process group, SIGKILL after a
timeout. Mountpoints are unmounted with fusermount3 -u, lazily if busy. Nothing is looked up or
killed by name.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from castore import mounts

log = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0          # seconds a process gets after SIGTERM before SIGKILL


def castore_argv() -> list[str]:
    """How to run the castore CLI of this installation."""
    beside = Path(sys.executable).with_name("castore")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "castore"]


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without CASTORE_* settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    env.setdefault("CASTORE_LOG", "WARNING")
    env.update(extra or {})
    return env


class Processes:
    """A registry of started processes and mountpoints. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        self._mounts: list[str] = []

    def spawn(self, argv: Sequence[str], log_path: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start argv in a new session, its output appended to log_path (or discarded)."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            out = open(log_path, "ab")
        with self._lock:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self._procs[proc.pid] = proc
            if not isinstance(out, int):
                self._logs[proc.pid] = out
        return proc

    def add_mount(self, mountpoint: Path) -> None:
        with self._lock:
            self._mounts.append(str(mountpoint))

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [pid for pid, p in self._procs.items() if p.poll() is None]

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL one process (its group too) and reap it."""
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)
        self._forget(proc)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after timeout; always reaps."""
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop within %.0f s: killing it", proc.pid, timeout)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        self._forget(proc)

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs.pop(proc.pid, None)
            fh = self._logs.pop(proc.pid, None)
        if fh is not None:
            fh.close()

    def unmount(self, mountpoint: str) -> None:
        try:
            mounts.unmount(mountpoint, lazy_if_busy=True)
        except mounts.MountError as exc:
            log.warning("%s", exc)
        with self._lock:
            if mountpoint in self._mounts and mounts.find(mountpoint) is None:
                self._mounts.remove(mountpoint)

    def mounted(self) -> list[str]:
        """Tracked mountpoints that are still mounted."""
        with self._lock:
            return [m for m in self._mounts if mounts.find(m) is not None]

    def stop_all(self) -> None:
        """End every tracked process (all get SIGTERM at once, then SIGKILL) and unmount every
        tracked mountpoint. Safe to call more than once."""
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                _signal_group(p.pid, signal.SIGTERM)
        for p in procs:
            self.stop(p)
        for m in list(self._mounts):
            self.unmount(m)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)              # the process is its group's leader (own session)
    except ProcessLookupError:
        pass
    except PermissionError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (and SIGHUP) raise KeyboardInterrupt, as SIGINT does, so that
    finally blocks run. The old handlers come back afterwards."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    old = {s: signal.signal(s, raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Within the block SIGINT, SIGTERM and SIGHUP are ignored: cleanup runs to its end."""
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
