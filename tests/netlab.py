"""Network partitions for cluster tests of real processes (a plain module: tests import it).

Each peer gets a network namespace of its own with one address, joined to the others by a
bridge that lives in a further namespace, so nothing changes in the machine's own network.
A partition detaches peers' ports from the bridge (their packets go nowhere, as when a cable
is pulled: connections hang until deadlines fire); heal() attaches them again. This kernel
has no netem, and nftables may be missing, so the bridge port is the switch.

Processes run in a peer's namespace through `nsenter --net=...` (never `ip netns exec`,
which also makes a mount namespace of its own: a FUSE mount made inside it would be invisible
here). Every name carries the test process's pid, so runs side by side do not collide, and
down() removes exactly what up() made. Needs root and iproute2.
"""
from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.231"


def missing() -> str | None:
    """Why network namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"no {tool}"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class NetLab:
    """n peers, peer i at address(i), all on one bridge until partitioned."""

    def __init__(self, n: int) -> None:
        tag = f"{os.getpid() % 100_000}"
        self.n = n
        self.bridge_ns = f"csb{tag}"
        self.names = [f"cs{tag}p{i}" for i in range(n)]
        self._ports = [f"cb{tag}p{i}" for i in range(n)]
        self._subnet = f"{SUBNET}.{os.getpid() % 250 + 1}"
        self._made: list[str] = []

    def address(self, i: int) -> str:
        return f"{self._subnet}.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        """argv prefix that runs a command in peer i's network (and nothing else of it)."""
        return ["nsenter", f"--net=/run/netns/{self.names[i]}"]

    def up(self) -> NetLab:
        try:
            _ip("netns", "add", self.bridge_ns)
            self._made.append(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, (ns, port) in enumerate(zip(self.names, self._ports)):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                    "netns", self.bridge_ns)
                _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
        except BaseException:
            self.down()
            raise
        return self

    def isolate(self, i: int) -> None:
        """Cut peer i off from every other peer."""
        _ip("-n", self.bridge_ns, "link", "set", self._ports[i], "nomaster")

    def heal(self) -> None:
        for port in self._ports:
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")

    def down(self) -> None:
        """Delete the namespaces made here (their veth pairs go with them). Stop the
        processes inside first."""
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self._made.clear()
