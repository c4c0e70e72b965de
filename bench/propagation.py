"""Propagation benchmark: real peers on loopback, each a `castore daemon --mount` process.

Measures, in one run: the latency from close() on peer A's mount to the content being readable
on peer B's mount (p50 and p99 over --samples files per run); how many metadata ops per second
B applies while it catches up with a namespace that moved on without it (A creates files with
`castore add -r`, renames and deletes them on its mount while B is stopped; B is then started
and timed until it has every op); and how long a new peer takes to join a cluster whose
namespace holds --files files (join -> its namespace complete). Writes
bench/results/propagation.json and propagation.png; prints one JSON line per figure.

    python bench/propagation.py --samples 200 --runs 3 --files 100000
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
from castore.benchsuite.cluster import (CLUSTER_ENV, LocalCluster, cli,  # noqa: E402
                                        wait_for)
from castore.benchsuite.processes import Processes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLL = 0.001                     # seconds between reads on B while waiting for a file


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ops_of(peer: Any) -> int:
    return int(peer.status()["stats"]["ops"])


def files_of(peer: Any) -> int:
    return int(peer.status()["stats"]["files"])


# -- close on A -> readable on B -----------------------------------------------------------
def latency(procs: Processes, tmp: Path, samples: int, size: int) -> dict[str, Any]:
    with LocalCluster(procs, tmp, 2, 2, mounted=(0, 1)) as c:
        ma, mb = c.peers[0].mount, c.peers[1].mount
        assert ma is not None and mb is not None
        os.mkdir(ma / "lat")
        wait_for(lambda: (mb / "lat").is_dir(), 30, "the directory reaches B", every=0.01)
        lags: list[float] = []
        for i in range(samples):
            data = os.urandom(size)
            name = f"lat/f{i:05d}.bin"
            with open(ma / name, "wb") as fh:
                fh.write(data)
            closed = time.perf_counter()
            deadline = closed + 30
            while True:
                try:
                    if (mb / name).read_bytes() == data:
                        break
                except OSError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{name} did not reach B within 30 s")
                time.sleep(POLL)
            lags.append(time.perf_counter() - closed)
            time.sleep(0.02)             # let B's caches settle: samples stay independent
    return {"samples": samples, "size_bytes": size, "p50_ms": percentile(lags, 50) * 1e3,
            "p99_ms": percentile(lags, 99) * 1e3, "max_ms": max(lags) * 1e3,
            "mean_ms": statistics.fmean(lags) * 1e3}


# -- metadata ops per second applied on B --------------------------------------------------
def tiny_tree(root: Path, files: int, per_dir: int = 500) -> None:
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}.txt").write_bytes(b"%d\n" % i)


def catch_up(procs: Processes, tmp: Path, files: int) -> dict[str, Any]:
    with LocalCluster(procs, tmp, 2, 2, mounted=(0,)) as c:
        a, b = c.peers
        wait_for(lambda: ops_of(b) == ops_of(a), 30, "B starts in step")
        b.stop(procs)
        tree = tmp / "tree"
        tiny_tree(tree, files)
        cli(a.home, "add", "-q", "-r", str(tree), "--to", "/meta")
        ma = a.mount
        assert ma is not None
        names = sorted((ma / "meta" / "tree").rglob("*.txt"))
        for p in names[: files // 3]:                     # renames on the mount
            os.rename(p, p.with_suffix(".md"))
        for p in names[files // 3: files // 3 + files // 6]:   # deletes on the mount
            os.unlink(p)
        want = ops_of(a)
        missing = want - ops_of_offline(b)
        start = time.monotonic()
        b.start(procs)
        ready = time.monotonic()
        took = wait_for(lambda: ops_of(b) >= want, 600, "B has every op", every=0.1)
        done = ready + took
        return {"files": files, "ops": missing, "seconds": done - start,
                "seconds_after_ready": took, "ops_per_s": missing / (done - start),
                "ops_per_s_after_ready": missing / max(took, 1e-9),
                "renames": files // 3, "deletes": files // 6}


def ops_of_offline(peer: Any) -> int:
    out = json.loads(cli(peer.home, "status", "--json"))
    return int(out["stats"]["ops"])


# -- bootstrap of a new peer ---------------------------------------------------------------
def bootstrap(procs: Processes, tmp: Path, files: int) -> dict[str, Any]:
    tree = tmp / "tree"
    tiny_tree(tree, files)
    with LocalCluster(procs, tmp, 1, 2) as c:
        a = c.peers[0]
        t = time.monotonic()
        cli(a.home, "add", "-q", "-r", str(tree), "--to", "/big")
        add_s = time.monotonic() - t
        have = files_of(a)
        start = time.monotonic()
        b = c.join()
        joined = time.monotonic() - start
        took = wait_for(lambda: files_of(b) >= have, 900, "the new peer has every file",
                        every=0.5)
        total = joined + took
        return {"files": have, "add_s": add_s, "add_files_per_s": files / add_s,
                "start_s": joined, "seconds": total, "files_per_s": have / total}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    lat = result["latency"]
    a.bar(["p50", "p99"], [result["latency_p50_ms"], result["latency_p99_ms"]])
    a.scatter(["p50"] * len(lat) + ["p99"] * len(lat),
              [r["p50_ms"] for r in lat] + [r["p99_ms"] for r in lat], color="k", zorder=3)
    a.set_ylabel("ms")
    a.set_title(f"close on A -> readable on B ({lat[0]['samples']} files per run)")
    b.bar(["from B's start", "from B serving"],
          [result["catch_up_ops_per_s"], result["catch_up_ops_per_s_after_ready"]])
    b.set_ylabel("ops/s")
    b.set_title(f"metadata ops applied on B ({result['catch_up'][0]['ops']} ops)")
    c.bar(["join"], [result["bootstrap_s"]])
    c.set_ylabel("seconds")
    c.set_title(f"new peer, {result['bootstrap'][0]['files']:,} files")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=200, help="files per latency run")
    ap.add_argument("--size", type=int, default=4096, help="bytes per latency file")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--meta-files", type=int, default=6000,
                    help="files created for the catch-up figure")
    ap.add_argument("--files", type=int, default=100_000, help="files for the join figure")
    ap.add_argument("--bootstrap-runs", type=int, default=1)
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((RESULTS / "propagation.json").read_text()),
             RESULTS / "propagation.png")
        return
    tmp = Path(tempfile.mkdtemp(prefix="castore-bench-prop-"))
    procs = Processes()
    try:
        lat = [latency(procs, tmp / f"lat{i}", args.samples, args.size)
               for i in range(args.runs)]
        for r in lat:
            print(json.dumps({"figure": "latency_run", **r}), flush=True)
        meta = [catch_up(procs, tmp / f"meta{i}", args.meta_files) for i in range(args.runs)]
        for r in meta:
            print(json.dumps({"figure": "catch_up_run", **r}), flush=True)
        boot = [bootstrap(procs, tmp / f"boot{i}", args.files)
                for i in range(args.bootstrap_runs)]
        result: dict[str, Any] = {
            "runs": args.runs, "settings": CLUSTER_ENV, "latency": lat, "catch_up": meta,
            "bootstrap": boot,
            "latency_p50_ms": statistics.median(r["p50_ms"] for r in lat),
            "latency_p99_ms": statistics.median(r["p99_ms"] for r in lat),
            "catch_up_ops_per_s": statistics.median(r["ops_per_s"] for r in meta),
            "catch_up_ops_per_s_after_ready": statistics.median(
                r["ops_per_s_after_ready"] for r in meta),
            "bootstrap_s": statistics.median(r["seconds"] for r in boot),
            "bootstrap_files_per_s": statistics.median(r["files_per_s"] for r in boot),
        }
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "propagation.json").write_text(json.dumps(result, indent=2))
        plot(result, RESULTS / "propagation.png")
        print(json.dumps({"figure": "latency", "p50_ms": result["latency_p50_ms"],
                          "p99_ms": result["latency_p99_ms"],
                          "samples_per_run": args.samples, "runs": args.runs}))
        print(json.dumps({"figure": "catch_up", "ops_per_s": result["catch_up_ops_per_s"],
                          "ops_per_s_after_ready": result["catch_up_ops_per_s_after_ready"],
                          "ops": meta[0]["ops"]}))
        print(json.dumps({"figure": "bootstrap", "seconds": result["bootstrap_s"],
                          "files": boot[0]["files"],
                          "files_per_s": result["bootstrap_files_per_s"]}))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
