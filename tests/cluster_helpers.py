"""Helpers for cluster tests: real `castore daemon` processes on loopback, each with its own
home and ports, tracked and stopped by PID (SIGTERM, then SIGKILL). Nothing is found or killed
by name.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CASTORE = [str(Path(sys.executable).parent / "castore")]
FAST = {"CASTORE_PROBE_INTERVAL": "0.3", "CASTORE_RECONCILE_INTERVAL": "2",
        "CASTORE_SETTLE_SECONDS": "0.5", "CASTORE_LOG": os.environ.get("CLUSTER_LOG", "INFO")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
    env.update(FAST)
    env.update(extra or {})
    return env


def cli(home: Path, *args: str, check: bool = True, binary: bool = False,
        timeout: float = 60.0) -> subprocess.CompletedProcess[Any]:
    argv = CASTORE + [args[0], "--home", str(home), *args[1:]]
    proc = subprocess.run(argv, capture_output=True, env=env_for(), timeout=timeout)
    if not binary:
        proc.stdout = proc.stdout.decode(errors="replace")
    proc.stderr = proc.stderr.decode(errors="replace")
    if check and proc.returncode != 0:
        raise AssertionError(f"castore {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout: {str(proc.stdout)[:2000]}\nstderr: {proc.stderr[-3000:]}")
    return proc


@dataclass
class Peer:
    name: str
    home: Path
    port: int
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    cmd: list[str] = field(default_factory=lambda: list(CASTORE))

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home.parent / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            self.cmd + ["daemon", "--home", str(self.home), "--listen",
                       f"127.0.0.1:{self.port}", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=env_for(self.env))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited {self.proc.returncode}:\n"
                                     + self.log()[-3000:])
            if (self.home / "daemon.json").exists() and self.status(check=False):
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon {self.name} did not start:\n" + self.log()[-3000:])

    def log(self) -> str:
        return (self.home.parent / f"{self.name}.log").read_text(errors="replace")

    def status(self, check: bool = True) -> dict[str, Any]:
        p = cli(self.home, "status", "--json", check=check)
        return json.loads(p.stdout) if p.returncode == 0 else {}

    def peers(self) -> list[dict[str, Any]]:
        return list(json.loads(cli(self.home, "peers", "--json").stdout)["peers"])

    def chunks(self) -> int:
        return int(self.status()["stats"]["chunks"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


@contextmanager
def cluster(tmp: Path, n: int, redundancy: int = 3, down_out: float = 600.0,
            extra: Callable[[int], list[str]] | None = None) -> Iterator[list[Peer]]:
    """Start n peers: the first creates the cluster, the others join with its token."""
    peers: list[Peer] = []
    try:
        first = Peer("p0", tmp / "p0", free_port(),
                     ["--redundancy", str(redundancy), "--down-out-interval", str(down_out),
                      "--zone", "z0", *(extra(0) if extra else [])])
        peers.append(first)
        first.start()
        for i in range(1, n):
            peers.append(join(tmp, first, f"p{i}", down_out, extra(i) if extra else []))
        wait_for(lambda: all(sum(p["state"] == "alive" for p in q.peers()) == n
                             for q in peers), 30, "every peer sees every other alive")
        yield peers
    finally:
        for p in peers:
            p.stop()


def join(tmp: Path, seed: Peer, name: str, down_out: float, args: list[str] | None = None,
         env: dict[str, str] | None = None, cmd: list[str] | None = None) -> Peer:
    token = cli(seed.home, "invite").stdout.strip()
    peer = Peer(name, tmp / name, free_port(),
                ["--token", token, "--down-out-interval", str(down_out), "--zone", name,
                 *(args or [])], env or {})
    if cmd:
        peer.cmd = cmd
    peer.start()
    return peer


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except AssertionError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        time.sleep(every)


def add(peer: Peer, path: Path, *flags: str) -> str:
    out = cli(peer.home, "add", str(path), *flags).stdout
    return out.split()[1]
