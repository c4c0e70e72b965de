"""Replication benchmark: N real peers on loopback.

Measures, in one run: write throughput (`castore add --wait`, W acks, and until every copy is
placed) at R = 1, 2, 3 against raw gRPC client streaming of 1 MiB messages on loopback; time to
restore R copies after kill -9 of a peer, in seconds per GiB, split into detection (dead),
waiting (down-out interval), settling (the repair loop's settle delay and listing, until a
survivor queues transfers) and transfer; bytes moved when a peer joins against the ideal
(every copy's share of the newcomer, total / (N + 1)). Also measured in the same run, as
ceilings the figures meet: the disk's rate of durable commits with the store's LMDB settings
(16 MiB of 1 MiB values per commit; every peer writes to this one disk, and an R=2 write
commits two copies before its acknowledgement) and the time of one CLI call (every
`add --wait` includes one). Writes bench/results/replication.json and replication.png.

    python bench/replication.py --size-mib 256 --runs 3
    python bench/replication.py --size-mib 1024 --runs 2 --only repair   (replication-repair.*)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from castore.benchsuite import MiB  # noqa: E402
from castore.benchsuite.cluster import LocalCluster, cli, free_port  # noqa: E402
from castore.benchsuite.processes import Processes  # noqa: E402
from castore.benchsuite.rawgrpc import raw_grpc, serve  # noqa: E402
from castore.benchsuite.steps import (join_movement, restore_after_kill,  # noqa: E402
                                      write_throughput)
from castore.benchsuite.workloads import make_random_file  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# -- ceilings of the parts, same run -------------------------------------------------------
def disk_sync(tmp: Path, runs: int, size: int = 256 * MiB) -> list[float]:
    """MB/s of durable LMDB commits (sync, metasync, no writemap: the store's settings)."""
    import lmdb
    value = os.urandom(MiB)
    out = []
    for i in range(runs):
        path = tmp / f"disk{i}"
        env = lmdb.open(str(path), map_size=4 * size, sync=True, metasync=True, writemap=False)
        start = time.perf_counter()
        for _ in range(size // (16 * MiB)):
            with env.begin(write=True) as txn:
                for _ in range(16):
                    txn.put(os.urandom(32), value)
        out.append(size / (time.perf_counter() - start) / 1e6)
        env.close()
        shutil.rmtree(path, ignore_errors=True)
    return out


def cli_call(procs: Processes, tmp: Path, runs: int) -> list[float]:
    """Seconds of one `castore status` against a running daemon."""
    with LocalCluster(procs, tmp / "cli", 1, 1) as c:
        out = []
        for _ in range(runs):
            start = time.perf_counter()
            cli(c.peers[0].home, "status")
            out.append(time.perf_counter() - start)
        return out


# -- the figures, each on a fresh cluster (the measuring code is castore.benchsuite) -------
def writes(procs: Processes, tmp: Path, n: int, r: int, data: list[Path],
           size: int) -> dict[str, Any]:
    with LocalCluster(procs, tmp / f"w{r}", n, r) as c:
        return write_throughput(c, data, size)


def repair_time(procs: Processes, tmp: Path, data: list[Path], down_out: float,
                run: int) -> dict[str, Any]:
    with LocalCluster(procs, tmp / f"r{run}", 3, 2, down_out) as c:
        for f in data:
            c.add(f)
        out = restore_after_kill(c, victim=1)
    return {k: v for k, v in out.items() if k not in ("timeline", "events")}


def join_moves(procs: Processes, tmp: Path, data: list[Path], run: int) -> dict[str, Any]:
    with LocalCluster(procs, tmp / f"j{run}", 3, 2) as c:
        for f in data:
            c.add(f)
        return join_movement(c)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    if result.get("writes"):
        rs = [w["R"] for w in result["writes"]]
        a.bar([f"R={r}\nack" for r in rs], [w["ack_median"] for w in result["writes"]])
        a.bar([f"R={r}\nplaced" for r in rs], [w["placed_median"] for w in result["writes"]])
        a.axhline(result["raw_grpc_median"], color="k", ls="--", label="raw gRPC stream")
        a.axhline(result["disk_sync_median"] / 2, color="r", ls=":",
                  label="disk sync rate / 2 (R=2 commits 2 copies)")
        a.set_ylabel("MB/s of unique data")
        a.legend()
    a.set_title("write throughput")
    if result.get("repair"):
        rep = result["repair"]
        bottom = 0.0
        for k in ["detection_s", "waiting_s", "settling_s", "transfer_s"]:
            v = statistics.median(x[k] for x in rep)
            b.bar(["kill -9"], [v], bottom=bottom, label=k)
            bottom += v
        b.set_ylabel("seconds")
        b.set_title(f"restore R copies ({result['repair_transfer_s_per_GiB']:.1f} s/GiB "
                    "transfer)")
        b.legend()
    if result.get("join"):
        j = result["join"]
        c.bar(["moved", "ideal"], [statistics.median(x["moved_bytes"] for x in j) / MiB,
                                   statistics.median(x["ideal_bytes"] for x in j) / MiB])
        c.set_ylabel("MiB")
        c.set_title(f"bytes moved on join ({result['join_ratio']:.2f}x ideal)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="data per write run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--down-out", type=float, default=3.0)
    ap.add_argument("--only", default="writes,repair,join",
                    help="comma-separated parts to run: writes, repair, join (default: all); "
                         "the baselines always run")
    ap.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_server:
        serve(args.raw_server)
        return
    size = args.size_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="castore-bench-"))
    procs = Processes()
    try:
        data = []
        for i in range(args.runs):
            f = tmp / f"data{i}.bin"
            make_random_file(f, size, seed=i + 1)
            data.append(f)
        parts = set(args.only.split(","))
        unknown = parts - {"writes", "repair", "join"}
        if unknown:
            ap.error(f"unknown part(s) for --only: {', '.join(sorted(unknown))}")
        raw = raw_grpc(procs, free_port(), size, args.runs)
        cli_s = cli_call(procs, tmp, args.runs)
        disk = disk_sync(tmp, 2)             # the disk is shared: sampled before each part
        result: dict[str, Any] = {
            "peers": args.peers, "size_bytes": size, "runs": args.runs,
            "raw_grpc_MBps": raw, "raw_grpc_median": statistics.median(raw),
            "cli_call_s": cli_s, "cli_call_median_s": statistics.median(cli_s)}
        if "writes" in parts:
            ws = [writes(procs, tmp, args.peers, r, data, size) for r in (1, 2, 3)]
            for w in ws:
                w["ratio_to_raw"] = w["ack_median"] / result["raw_grpc_median"]
            result["writes"] = ws
            disk += disk_sync(tmp, 1)
        if "repair" in parts:
            repair = [repair_time(procs, tmp, data, args.down_out, i)
                      for i in range(min(args.runs, 2))]
            result["repair"] = repair
            for k in ("transfer", "total"):
                result[f"repair_{k}_s_per_GiB"] = statistics.median(
                    r[f"{k}_s_per_GiB"] for r in repair)
            disk += disk_sync(tmp, 1)
        if "join" in parts:
            joins = [join_moves(procs, tmp, data, i) for i in range(min(args.runs, 2))]
            result["join"] = joins
            result["join_ratio"] = statistics.median(j["ratio"] for j in joins)
        result["disk_sync_MBps"] = disk
        result["disk_sync_median"] = statistics.median(disk)
        RESULTS.mkdir(exist_ok=True)
        name = "replication" if parts == {"writes", "repair", "join"} else \
            "replication-" + "-".join(sorted(parts))
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
        plot(result, RESULTS / f"{name}.png")
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}))
        for w in result.get("writes", []):
            print(json.dumps({k: w[k] for k in ("R", "ack_median", "placed_median",
                                                  "ratio_to_raw")}))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
