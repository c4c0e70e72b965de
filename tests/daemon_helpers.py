"""Helpers for tests that drive real castore processes: the CLI, daemons, seeded file trees and
small tmpfs mounts. A plain module (not a conftest): test modules import what they use.

Every process started here is tracked and stopped by PID (SIGTERM, then SIGKILL after a
timeout); every tmpfs mounted here is unmounted on the way out. Nothing is found or killed by
name.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import re
import shutil
import signal
import stat as st
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def _castore_command() -> list[str]:
    """The `castore` entry point of the interpreter running the tests (venv first)."""
    beside = Path(sys.executable).parent / "castore"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("castore")
    return [found] if found else [sys.executable, "-m", "castore"]


CASTORE = _castore_command()
ADDED = re.compile(r"^added ([0-9a-f]{64}) (/.*)$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")

# Exit codes documented in castore/cli/__init__.py.
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTEGRITY = 0, 1, 2, 3, 4
EXIT_UNAVAILABLE, EXIT_DISK_FULL = 5, 7

_live: dict[int, subprocess.Popen[Any]] = {}     # every process started here, by PID


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for castore processes: ours without CASTORE_*, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    env.update(extra or {})
    return env


def _argv(args: Sequence[str | os.PathLike[str]], home: str | os.PathLike[str] | None
          ) -> list[str]:
    argv = [os.fspath(a) for a in args]
    if home is not None and argv:
        argv[1:1] = ["--home", os.fspath(home)]      # --home belongs to the subcommand
    return CASTORE + argv


def run(*args: str | os.PathLike[str], home: str | os.PathLike[str] | None = None,
        check: bool = True, binary: bool = False, env: dict[str, str] | None = None,
        timeout: float = 60.0, input: bytes | None = None) -> subprocess.CompletedProcess[Any]:
    """Run `castore ARGS --home HOME` and return the CompletedProcess.

    stderr is always text; stdout is bytes with binary=True, else text. With check, a non-zero
    exit fails the test, showing both streams.
    """
    proc = subprocess.run(_argv(args, home), capture_output=True, env=cli_env(env),
                          timeout=timeout, input=input)
    proc.stderr = proc.stderr.decode("utf-8", errors="replace")
    if not binary:
        proc.stdout = proc.stdout.decode("utf-8", errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"castore {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout!r:.2000}\nstderr: {proc.stderr}")
    return proc


def run_json(*args: str | os.PathLike[str], home: str | os.PathLike[str] | None = None,
             **kw: Any) -> Any:
    """Run a command with --json and parse its single JSON document."""
    return json.loads(run(*args, "--json", home=home, **kw).stdout)


def assert_user_error(proc: subprocess.CompletedProcess[Any], code: int,
                      contains: str = "") -> str:
    """A user error: the documented exit code, exactly one stderr line 'castore: error: ...',
    no traceback. Returns the line."""
    err = proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"wanted one stderr line, got {lines!r}"
    assert lines[0].startswith("castore: error: "), lines[0]
    assert contains in lines[0], f"{contains!r} not in {lines[0]!r}"
    return lines[0]


def added_lines(stdout: str) -> dict[str, str]:
    """{namespace path: content id} from complete 'added <id> <path>' lines."""
    out = {}
    for line in stdout.splitlines(keepends=True):
        m = ADDED.match(line.rstrip("\n"))
        if m and line.endswith("\n"):
            out[m.group(2)] = m.group(1)
    return out


# -- processes ----------------------------------------------------------------------------
def start_process(argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
    """Popen, tracked so stop_process (or the atexit net) can end it by PID."""
    proc = subprocess.Popen(list(argv), **kw)
    _live[proc.pid] = proc
    return proc


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
                 timeout: float = 10.0) -> int:
    """Send sig to this one process, wait, SIGKILL it after timeout. Returns its exit code."""
    try:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        return int(proc.returncode)
    finally:
        _live.pop(proc.pid, None)


@atexit.register
def _kill_leftovers() -> None:   # a safety net only: every test stops its own in finally
    for proc in list(_live.values()):
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


class Daemon:
    """`castore daemon --home HOME` as a child process, logging to HOME/../<name>.log."""

    def __init__(self, home: Path, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.home = Path(home)
        self.env = env
        self.log = log or self.home.parent / f"daemon-{self.home.name}.log"
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def socket(self) -> Path:
        return self.home / "castore.sock"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, deadline: float = 20.0) -> Daemon:
        """Start and wait until `castore status --json` reports this daemon running."""
        with open(self.log, "ab") as log:
            self.proc = start_process(_argv(["daemon"], self.home), stdout=log,
                                      stderr=subprocess.STDOUT, env=cli_env(self.env))
        self.wait_running(deadline)
        return self

    def wait_running(self, deadline: float = 20.0) -> dict[str, Any]:
        assert self.proc is not None
        until = time.monotonic() + deadline
        last = ""
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise AssertionError(f"castore daemon exited {self.proc.returncode} while "
                                     f"starting:\n{self.log_text()}")
            if self.socket.exists():
                proc = run("status", "--json", home=self.home, check=False, env=self.env)
                last = proc.stdout + proc.stderr
                if proc.returncode == 0:
                    status = json.loads(proc.stdout)
                    if status["daemon"] == "running" and status["pid"] == self.proc.pid:
                        return dict(status)
            time.sleep(0.05)
        raise AssertionError(f"castore daemon not running after {deadline} s: {last}\n"
                             f"{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal it (SIGTERM by default; SIGKILL after timeout). Returns its exit code."""
        if self.proc is None:
            return 0
        return stop_process(self.proc, sig, timeout)

    def kill9(self) -> int:
        return self.stop(signal.SIGKILL)


@contextmanager
def running_daemon(home: Path, env: dict[str, str] | None = None,
                   log: Path | None = None) -> Iterator[Daemon]:
    """A started daemon, stopped by PID on the way out whatever happens."""
    d = Daemon(home, env, log)
    try:
        d.start()
        yield d
    finally:
        d.stop()


# -- seeded test data ---------------------------------------------------------------------
@dataclass
class Tree:
    """What make_tree wrote under root: relative paths of files (bytes), symlinks, dirs."""

    root: Path
    files: dict[str, bytes] = field(default_factory=dict)
    symlinks: dict[str, str] = field(default_factory=dict)
    dirs: list[str] = field(default_factory=list)


FILE_MODES = (0o644, 0o600, 0o755, 0o640, 0o444)
DIR_MODES = (0o755, 0o750, 0o700)


def make_file(path: Path, size: int, seed: int, marker: bytes = b"") -> bytes:
    """Seeded random bytes (with marker in the middle) written to path; returns them."""
    rng = random.Random(seed)
    half = max(0, size - len(marker)) // 2
    data = rng.randbytes(half) + marker + rng.randbytes(max(0, size - len(marker) - half))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def make_tree(root: Path, seed: int, n_files: int = 20, max_size: int = 64 << 10,
              big: Sequence[int] = (), n_dirs: int = 4, n_symlinks: int = 2,
              empty_files: int = 1) -> Tree:
    """A seeded tree: nested dirs, files of random sizes, modes and mtimes (to the ns),
    `big` extra files of the given sizes, and relative symlinks (one dangling)."""
    rng = random.Random(seed)
    tree = Tree(Path(root))
    root.mkdir(parents=True, exist_ok=True)
    dirs = [""]
    for i in range(n_dirs):
        parent = rng.choice(dirs)
        rel = f"{parent}/d{i}".lstrip("/")
        (root / rel).mkdir()
        dirs.append(rel)
        tree.dirs.append(rel)
    sizes = [rng.randrange(1, max_size + 1) for _ in range(n_files)] + [0] * empty_files + \
        list(big)
    for i, size in enumerate(sizes):
        rel = f"{rng.choice(dirs)}/f{i:04d}.bin".lstrip("/")
        p = root / rel
        tree.files[rel] = rng.randbytes(size)
        p.write_bytes(tree.files[rel])
        os.chmod(p, rng.choice(FILE_MODES))
        t = rng.randrange(1_000_000_000, 1_700_000_000) * 10**9 + rng.randrange(10**9)
        os.utime(p, ns=(t, t))
    for i in range(n_symlinks):
        rel = f"{rng.choice(dirs)}/link{i}".lstrip("/")
        target = "no-such-target" if i == 0 else os.path.relpath(
            root / rng.choice(list(tree.files)), (root / rel).parent)
        os.symlink(target, root / rel)
        tree.symlinks[rel] = target
    for rel in sorted(tree.dirs, key=lambda r: -r.count("/")):     # deepest first
        os.chmod(root / rel, rng.choice(DIR_MODES))
        t = rng.randrange(1_000_000_000, 1_700_000_000) * 10**9 + rng.randrange(10**9)
        os.utime(root / rel, ns=(t, t))
    return tree


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root: (kind, mode, mtime_ns, bytes or link target). Symlink times
    are left out (castore does not restore them)."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            info = p.lstat()
            if st.S_ISLNK(info.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif st.S_ISDIR(info.st_mode):
                out[rel] = ("dir", st.S_IMODE(info.st_mode), info.st_mtime_ns)
            else:
                out[rel] = ("file", st.S_IMODE(info.st_mode), info.st_mtime_ns, p.read_bytes())
    return out


def assert_same_tree(expected: Path, actual: Path) -> None:
    """diff -r is clean and every entry has the same kind, mode, mtime and bytes/target."""
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(expected), str(actual)],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    want, got = snapshot(expected), snapshot(actual)
    assert sorted(got) == sorted(want)
    for rel in want:
        assert got[rel] == want[rel], f"{rel}: {got[rel][:3]} != {want[rel][:3]}"


# -- tmpfs --------------------------------------------------------------------------------
def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the disk-full tests need root (mount -t tmpfs); run with -k 'not tmpfs'")


@contextmanager
def tmpfs(path: Path, size: str = "64m") -> Iterator[Path]:
    """Mount a tmpfs of `size` at path for the block; always unmounted afterwards."""
    require_root()
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        for attempt in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
