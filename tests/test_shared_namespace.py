"""One namespace on every peer: real daemons in a cluster on loopback, driven by the CLI.
A file added on one peer is listed and readable on the others within 2 s; renames and deletes
propagate; simultaneous writes to one path keep every version on every peer."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster_helpers import CASTORE, cli, cluster, env_for, wait_for

pytestmark = pytest.mark.timeout(240)


def ls(peer, path: str = "/") -> list[str]:  # type: ignore[no-untyped-def]
    out = cli(peer.home, "ls", path, "--json", check=False)
    return sorted(e["name"] for e in json.loads(out.stdout)) if out.returncode == 0 else []


def test_files_renames_and_deletes_reach_every_peer(tmp_path: Path) -> None:
    with cluster(tmp_path, 3, redundancy=2) as (a, b, c):
        src = tmp_path / "report.txt"
        src.write_bytes(b"quarterly figures\n" * 1000)
        cli(a.home, "add", str(src), "--to", "/docs")
        start = time.monotonic()
        wait_for(lambda: ls(b, "/docs") == ["report.txt"] and ls(c, "/docs") == ["report.txt"],
                 10, "the new file is listed on every peer", every=0.05)
        assert time.monotonic() - start < 2.0 + 1.0    # 2 s, plus CLI start-up per poll
        assert cli(c.home, "cat", "/docs/report.txt", binary=True).stdout == src.read_bytes()
        cli(b.home, "mv", "/docs/report.txt", "/docs/final.txt")
        wait_for(lambda: ls(a, "/docs") == ls(c, "/docs") == ["final.txt"], 10,
                 "the rename reaches every peer", every=0.05)
        cli(c.home, "rm", "/docs/final.txt")
        wait_for(lambda: ls(a, "/docs") == ls(b, "/docs") == [], 10,
                 "the delete reaches every peer", every=0.05)


def test_simultaneous_writes_keep_every_version_on_every_peer(tmp_path: Path) -> None:
    with cluster(tmp_path, 2, redundancy=2) as (a, b):
        versions: set[bytes] = set()
        for rnd in range(5):
            procs = []
            for peer in (a, b):
                data = f"round {rnd} from {peer.name}\n".encode() * 50
                versions.add(data)
                f = tmp_path / f"{peer.name}-{rnd}" / "shared.txt"
                f.parent.mkdir()
                f.write_bytes(data)
                procs.append(subprocess.Popen(
                    CASTORE + ["add", "--home", str(peer.home), "-q", str(f)],
                    env=env_for(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            for p in procs:
                assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""
        # (whether two adds a few hundred ms apart overlap depends on timing: ops reach the
        # other peer in tens of ms. tests/test_shared_drive.py makes truly concurrent writes)
        wait_for(lambda: ls(a) == ls(b) and "shared.txt" in ls(a), 20,
                 "both peers list the same names")
        names = ls(a)
        assert "shared.txt" in names
        seen = set()
        for name in names:
            for peer in (a, b):
                seen.add(cli(peer.home, "cat", "/" + name, binary=True).stdout)
        # every version that is still a head is readable on both peers; the ones replaced by a
        # later write on the same peer are superseded, never lost to the other peer's write
        assert seen <= versions
        assert len(seen) == len(names)
