"""Replication benchmark: N real peers on loopback.

Measures, in one run: write throughput (`castore add --wait`, W acks, and until every copy is
placed) at R = 1, 2, 3 against raw gRPC client streaming of 1 MiB messages on loopback; time to
restore R copies after kill -9 of a peer, in seconds per GiB, split into detection (dead),
waiting (down-out interval) and transfer; bytes moved when a peer joins against the ideal
(every copy's share of the newcomer, total / (N + 1)). Writes bench/results/replication.json
and replication.png.

    python bench/replication.py --size-mib 256 --runs 3
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_helpers import Peer, cli, cluster, free_port, join, wait_for  # noqa: E402
from common import RESULTS, make_random_file  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


# -- raw gRPC baseline --------------------------------------------------------------------
def raw_server(port: int) -> None:
    import grpc

    def sink(requests: Any, context: Any) -> bytes:
        n = 0
        for r in requests:
            n += len(r)
        return str(n).encode()
    opts = [("grpc.max_receive_message_length", 16 * MiB),
            ("grpc.experimental.tcp_read_chunk_size", 4 * MiB)]
    server = grpc.server(ThreadPoolExecutor(4), options=opts)
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Sink": grpc.stream_unary_rpc_method_handler(sink)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def raw_grpc(size: int, runs: int) -> list[float]:
    import grpc
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--raw-server", str(port)])
    try:
        time.sleep(1.0)
        ch = grpc.insecure_channel(f"127.0.0.1:{port}",
                                   options=[("grpc.max_send_message_length", 16 * MiB)])
        call = ch.stream_unary("/bench.Raw/Sink")
        block = b"x" * MiB
        out = []
        for _ in range(runs):
            start = time.perf_counter()
            call(iter([block] * (size // MiB)), timeout=300, wait_for_ready=True)
            out.append(size / (time.perf_counter() - start) / 1e6)
        ch.close()
        return out
    finally:
        proc.kill()
        proc.wait()


# -- cluster figures ----------------------------------------------------------------------
def _queue_empty(p: Peer) -> bool:
    return int(p.status()["cluster"]["replication_queue"]) == 0


def write_throughput(tmp: Path, n: int, r: int, data: list[Path], size: int) -> dict[str, Any]:
    with cluster(tmp / f"w{r}", n, redundancy=r) as peers:
        acked, placed = [], []
        for f in data:
            start = time.perf_counter()
            cli(peers[0].home, "add", str(f), "--wait", timeout=600)
            t_ack = time.perf_counter() - start
            wait_for(lambda: _queue_empty(peers[0]), 600, "every copy sent", every=0.05)
            t_all = time.perf_counter() - start
            acked.append(size / t_ack / 1e6)
            placed.append(size / t_all / 1e6)
        return {"R": r, "ack_MBps": acked, "placed_MBps": placed,
                "ack_median": statistics.median(acked), "placed_median": statistics.median(placed)}


def _states(p: Peer) -> dict[str, str]:
    return {row["peer_id"]: row["state"] for row in p.peers()}


def _stored(p: Peer) -> int:
    return int(p.status()["stats"]["stored_bytes"])


def repair_time(tmp: Path, data: list[Path], down_out: float, run: int) -> dict[str, Any]:
    with cluster(tmp / f"r{run}", 3, redundancy=2, down_out=down_out) as peers:
        for f in data:
            cli(peers[0].home, "add", str(f), "--wait", timeout=600)
        for p in peers:
            cli(p.home, "repair", "--wait", timeout=600)
        total = sum(p.chunks() for p in peers)
        victim = peers[1]
        lost = _stored(victim)
        vid = victim.status()["cluster"]["peer_id"]
        survivors = [peers[0], peers[2]]
        t0 = time.perf_counter()
        victim.kill9()
        wait_for(lambda: _states(survivors[0]).get(vid) in ("dead", "out"), 120, "dead",
                 every=0.05)
        t_dead = time.perf_counter()
        wait_for(lambda: _states(survivors[0]).get(vid) == "out", 120, "out", every=0.05)
        t_out = time.perf_counter()
        wait_for(lambda: sum(p.chunks() for p in survivors) >= total, 600,
                 "R copies on the survivors", every=0.1)
        t_done = time.perf_counter()
        gib = lost / GiB
        return {"lost_bytes": lost, "detection_s": t_dead - t0, "waiting_s": t_out - t_dead,
                "transfer_s": t_done - t_out,
                "transfer_s_per_GiB": (t_done - t_out) / gib if gib else 0.0,
                "total_s_per_GiB": (t_done - t0) / gib if gib else 0.0}


def join_moves(tmp: Path, data: list[Path], run: int) -> dict[str, Any]:
    with cluster(tmp / f"j{run}", 3, redundancy=2) as peers:
        for f in data:
            cli(peers[0].home, "add", str(f), "--wait", timeout=600)
        for p in peers:
            cli(p.home, "repair", "--wait", timeout=600)
        before = [_stored(p) for p in peers]
        total = sum(before)
        newcomer = join(tmp / f"j{run}", peers[0], "p3", 600)
        peers.append(newcomer)
        try:
            wait_for(lambda: all(len(p.peers()) == 4 for p in peers), 60, "joined")
            time.sleep(2)
            for p in peers:
                cli(p.home, "repair", "--wait", timeout=600)
            wait_for(lambda: abs(sum(_stored(p) for p in peers) - total) < 2 * MiB, 120,
                     "settled", every=0.3)
            moved_in = _stored(newcomer)
            grown = sum(max(0, _stored(p) - b) for p, b in zip(peers, before))
        finally:
            newcomer.stop()
        ideal = total / 4
        return {"moved_bytes": moved_in + grown, "ideal_bytes": ideal,
                "ratio": (moved_in + grown) / ideal, "old_peers_received": grown}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    rs = [w["R"] for w in result["writes"]]
    a.bar([f"R={r}\nack" for r in rs], [w["ack_median"] for w in result["writes"]])
    a.bar([f"R={r}\nplaced" for r in rs], [w["placed_median"] for w in result["writes"]])
    a.axhline(result["raw_grpc_median"], color="k", ls="--", label="raw gRPC stream")
    a.set_ylabel("MB/s of unique data")
    a.set_title("write throughput")
    a.legend()
    rep = result["repair"]
    parts = ["detection_s", "waiting_s", "transfer_s"]
    bottom = 0.0
    for k in parts:
        v = statistics.median(x[k] for x in rep)
        b.bar(["kill -9"], [v], bottom=bottom, label=k)
        bottom += v
    b.set_ylabel("seconds")
    b.set_title(f"restore R copies ({result['repair_transfer_s_per_GiB']:.1f} s/GiB transfer)")
    b.legend()
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
    ap.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.raw_server:
        raw_server(args.raw_server)
        return
    size = args.size_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="castore-bench-"))
    try:
        data = []
        for i in range(args.runs):
            f = tmp / f"data{i}.bin"
            make_random_file(f, size, seed=i + 1)
            data.append(f)
        raw = raw_grpc(size, args.runs)
        writes = [write_throughput(tmp, args.peers, r, data, size) for r in (1, 2, 3)]
        repair = [repair_time(tmp, data, args.down_out, i) for i in range(min(args.runs, 2))]
        joins = [join_moves(tmp, data, i) for i in range(min(args.runs, 2))]
        result: dict[str, Any] = {
            "peers": args.peers, "size_bytes": size, "runs": args.runs,
            "raw_grpc_MBps": raw, "raw_grpc_median": statistics.median(raw),
            "writes": writes, "repair": repair, "join": joins,
            "repair_transfer_s_per_GiB": statistics.median(r["transfer_s_per_GiB"]
                                                           for r in repair),
            "repair_total_s_per_GiB": statistics.median(r["total_s_per_GiB"] for r in repair),
            "join_ratio": statistics.median(j["ratio"] for j in joins),
        }
        for w in writes:
            w["ratio_to_raw"] = w["ack_median"] / result["raw_grpc_median"]
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "replication.json").write_text(json.dumps(result, indent=2))
        plot(result, RESULTS / "replication.png")
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}))
        for w in writes:
            print(json.dumps({k: w[k] for k in ("R", "ack_median", "placed_median",
                                                  "ratio_to_raw")}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
