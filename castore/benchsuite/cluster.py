"""A local cluster for benchmarks: N `castore daemon` processes on loopback, each with its own
home and port, started through a Processes registry (own session, ended by PID). The first peer
creates the cluster; the others join with a token from `castore invite`. State is read through
each daemon's client API on its UNIX socket (the Status and Peers calls behind
`castore status --json` and `castore peers --json`).
"""
from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from castore import mounts
from castore.benchsuite.processes import Processes, castore_argv, daemon_env
from castore.config import Config
from castore.errors import CastoreError

START_TIMEOUT = 60.0         # seconds for a daemon to answer (this machine is often busy)
RPC_TIMEOUT = 15.0           # seconds per status call
CLI_TIMEOUT = 600.0          # seconds for one `castore add --wait` and the like

# Faster membership and repair loops than the defaults, so that a kill -9 is seen in about a
# second and the repair timeline has points every few seconds; recorded in the results.
CLUSTER_ENV = {"CASTORE_PROBE_INTERVAL": "0.3", "CASTORE_RECONCILE_INTERVAL": "2",
               "CASTORE_SETTLE_SECONDS": "0.5"}


class BenchError(CastoreError):
    """A benchmark step could not run (a daemon did not start, a wait timed out)."""

    exit_code = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Poll cond until it is true; returns the seconds waited. BenchError after timeout."""
    start = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - start
        except BenchError:
            raise
        except CastoreError:             # the daemon is busy or not up yet: poll again
            pass
        if time.monotonic() - start > timeout:
            raise BenchError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(every)


def cli(home: Path, *args: str, timeout: float = CLI_TIMEOUT) -> str:
    """Run `castore ARGS --home HOME`; its stdout. BenchError with its stderr if it fails."""
    argv = [*castore_argv(), args[0], "--home", str(home), *args[1:]]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=daemon_env(),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"castore {' '.join(args)} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        raise BenchError(f"castore {' '.join(args)} exited {proc.returncode}: {last}")
    return proc.stdout


@dataclass
class LocalPeer:
    """One daemon on 127.0.0.1:port with its home (and optionally its drive) under root."""

    name: str
    root: Path
    port: int
    args: list[str]
    mount: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _remote: Any = field(default=None, repr=False)

    @property
    def home(self) -> Path:
        return self.root / self.name

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"

    def start(self, procs: Processes, timeout: float = START_TIMEOUT) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        argv = [*castore_argv(), "daemon", "--home", str(self.home),
                "--listen", f"127.0.0.1:{self.port}", *self.args]
        if self.mount is not None:
            self.mount.mkdir(parents=True, exist_ok=True)
            argv += ["--mount", str(self.mount)]
            procs.add_mount(self.mount)
        self.proc = procs.spawn(argv, self.log, daemon_env(CLUSTER_ENV))
        wait_for(self._ready, timeout, f"peer {self.name} answers", every=0.1)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-1500:]
            raise BenchError(f"daemon {self.name} exited {self.proc.returncode}: {tail}")
        if not (self.home / "daemon.json").exists():
            return False
        self.status()
        return self.mount is None or mounts.state(str(self.mount)) == "live"

    def _api(self) -> Any:
        if self._remote is None:
            from castore.rpc.client import RemoteRepo
            self._remote = RemoteRepo(Config.load(self.home, env={}, rpc_timeout=RPC_TIMEOUT))
        return self._remote

    def status(self) -> dict[str, Any]:
        """The fields of `castore status --json` the bench reads."""
        r = self._api().status()
        return {"stats": dict(r.stats), "peer_id": r.peer_id,
                "under_replicated": r.under_replicated, "repair_done": r.repair_done,
                "repair_pending": r.repair_pending,
                "replication_queue": r.replication_queue, "live_peers": r.live_peers,
                "members": r.members}

    def peer_states(self) -> dict[str, str]:
        """peer id -> state, as `castore peers --json` lists them."""
        from castore._proto import castore_pb2 as pb
        from castore.rpc.cluster_api import call
        reply = call(self._api(), "peers", "Peers", pb.Empty(), RPC_TIMEOUT)
        return {p.peer_id: p.state for p in reply.peers}

    def invite(self) -> str:
        from castore._proto import castore_pb2 as pb
        from castore.rpc.cluster_api import call
        return str(call(self._api(), "invite", "Invite", pb.Empty(), RPC_TIMEOUT).token)

    def repair(self, timeout: float = CLI_TIMEOUT) -> None:
        """A repair pass now, waited for (as `castore repair --wait`)."""
        from castore._proto import castore_pb2 as pb
        from castore.rpc.cluster_api import call
        call(self._api(), "repair", "Repair", pb.RepairRequest(wait=True, timeout=timeout),
             timeout + 30)

    def stored(self) -> int:
        return int(self.status()["stats"]["stored_bytes"])

    def chunks(self) -> int:
        return int(self.status()["stats"]["chunks"])

    def close_api(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None

    def stop(self, procs: Processes) -> None:
        self.close_api()
        if self.proc is not None:
            procs.stop(self.proc)
        if self.mount is not None:
            procs.unmount(str(self.mount))

    def kill9(self, procs: Processes) -> None:
        self.close_api()
        assert self.proc is not None
        procs.kill9(self.proc)


class LocalCluster:
    """n peers under root; mounts[i] gives peer i a drive at root/mnt-p<i>."""

    def __init__(self, procs: Processes, root: Path, n: int, redundancy: int,
                 down_out: float = 600.0, mounted: Sequence[int] = ()) -> None:
        self.procs = procs
        self.root = root
        self.n = n
        self.redundancy = redundancy
        self.down_out = down_out
        self.mounted = set(mounted)
        self.peers: list[LocalPeer] = []

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _peer(self, i: int, args: list[str]) -> LocalPeer:
        mount = self.root / f"mnt-p{i}" if i in self.mounted else None
        return LocalPeer(f"p{i}", self.root, free_port(),
                         [*args, "--down-out-interval", str(self.down_out), "--zone", f"z{i}"],
                         mount)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        first = self._peer(0, ["--redundancy", str(self.redundancy)])
        self.peers.append(first)
        first.start(self.procs)
        for _ in range(1, self.n):
            self.join()
        wait_for(lambda: all(sum(s == "alive" for s in p.peer_states().values()) == self.n
                             for p in self.peers), timeout, "every peer sees every other alive")

    def join(self) -> LocalPeer:
        """Start one more peer, joined with a token from the first."""
        peer = self._peer(len(self.peers), ["--token", self.peers[0].invite()])
        self.peers.append(peer)
        peer.start(self.procs)
        return peer

    def add(self, path: Path, peer: int = 0, dest: str = "/") -> None:
        """`castore add PATH --wait` on a peer: returns once W copies are durable."""
        cli(self.peers[peer].home, "add", "-q", str(path), "--to", dest, "--wait")

    def queue_empty(self, peer: int = 0) -> bool:
        return int(self.peers[peer].status()["replication_queue"]) == 0

    def stop(self) -> None:
        for p in self.peers:
            p.close_api()
        for p in self.peers:                  # SIGTERM to all first: they stop in parallel
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
        for p in self.peers:
            p.stop(self.procs)
