"""Ingest benchmark: how fast files go into a castore repo, against cp and BLAKE3 alone.

    python bench/ingest.py [--size-mib 1024] [--files 10000] [--runs 3] [--work DIR]
                           [--only large,small,dedup]

Measures, in one run (median of --runs each):
  - one large file, incompressible and compressible ("real": files of /usr concatenated):
    castore add (offline, the repo opened by the CLI) and castore add through a running
    daemon, against `cp` + fsync of the copy and BLAKE3 hashing alone;
  - a tree of many small files: castore add -r (offline and daemon) against `cp -r` + sync;
  - store size and dedup ratio after adding a second, mostly identical version of the tree,
    with compression on and off.
Writes bench/results/ingest.json and bench/results/ingest.png.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (castore_cmd, emit, machine, make_random_file, make_real_file,  # noqa: E402
                    make_tree, median_of, mutate_tree, run, timed, write_json)

import castore  # noqa: E402
from castore.benchsuite.workloads import blake3_seconds  # noqa: E402

PARTS = ("large", "small", "dedup")     # the groups of figures --only can pick


class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc = subprocess.Popen(castore_cmd() + ["daemon", "--home", str(home)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = subprocess.run(castore_cmd() + ["status", "--json", "--home", str(home)],
                               capture_output=True, text=True)
            if r.returncode == 0 and json.loads(r.stdout).get("daemon") == "running":
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("the daemon did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a running process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def add_time(src: Path, home: Path, recursive: bool, daemon: bool,
             env: dict[str, str] | None = None, cores: list[float] | None = None) -> float:
    """Seconds of one `castore add`; appends to cores the CPU it used (the client's, plus the
    daemon's) per second of the run: 2.0 would be both cores busy throughout."""
    shutil.rmtree(home, ignore_errors=True)
    run(castore_cmd() + ["init", "--home", str(home)], env=env)
    args = castore_cmd() + ["add", "-q", "--home", str(home), str(src)] + (
        ["-r"] if recursive else [])
    d = Daemon(home) if daemon else None
    try:
        cpu0 = children_cpu_s() + (proc_cpu_s(d.proc.pid) if d else 0.0)
        seconds = timed(lambda: run(args, env=env))
        cpu = children_cpu_s() + (proc_cpu_s(d.proc.pid) if d else 0.0) - cpu0
        if cores is not None:
            cores.append(cpu / seconds)
        return seconds
    finally:
        if d:
            d.stop()


def cp_time(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    if dst.exists():
        dst.unlink()

    def go() -> None:
        run(["cp", "-r", str(src), str(dst)])
        if dst.is_dir():
            os.sync()        # one flush for the tree (it also waits for others' dirty data)
        else:
            fd = os.open(dst, os.O_RDONLY)   # just this file: a global sync would also wait
            try:                             # for whatever other processes have written
                os.fsync(fd)
            finally:
                os.close(fd)
    return timed(go)


def stats(home: Path) -> dict[str, Any]:
    r = run(castore_cmd() + ["status", "--json", "--home", str(home)])
    return dict(json.loads(r.stdout)["stats"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--only", default=",".join(PARTS), type=parts,
                    help="figures to measure, of large,small,dedup (default: all); results of "
                    "a part are written as ingest-<parts>.json/.png")
    args = ap.parse_args()
    name = "ingest" if set(args.only) == set(PARTS) else "ingest-" + "-".join(args.only)
    # Every timed `castore` run is a fresh process, so its start-up counts. Byte-compile the
    # package first, as installing it does: with PYTHONDONTWRITEBYTECODE set (or a read-only
    # source tree) an editable install would otherwise recompile its modules on every run.
    compileall.compile_dir(str(Path(castore.__file__).parent), quiet=1)
    work = Path(args.work or tempfile.mkdtemp(prefix="castore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib << 20
    results: dict[str, Any] = {"machine": machine(), "params": vars(args), "figures": {}}
    fig = results["figures"]
    try:
        rand = work / "random.bin"
        real = work / "real.bin"
        tree = work / "tree"
        home = work / "home"
        large = []
        if "large" in args.only:
            make_random_file(rand, size)
            real_size = make_real_file(real, size)
            large = [("large_incompressible", rand, size), ("large_compressible", real, real_size)]
        if "small" in args.only or "dedup" in args.only:
            make_tree(tree, args.files)
        for label, src, nbytes in large:
            for f in (src,):
                f.read_bytes() if nbytes <= (2 << 30) else None   # warm the page cache
            base, base_runs = median_of(args.runs, lambda i: cp_time(src, work / "copy.bin"))
            hashed, _ = median_of(args.runs, lambda i: blake3_seconds(src))
            off_cores: list[float] = []
            d_cores: list[float] = []
            offline, off_runs = median_of(
                args.runs, lambda i: add_time(src, home, False, False, cores=off_cores))
            daemon, d_runs = median_of(
                args.runs, lambda i: add_time(src, home, False, True, cores=d_cores))
            st = stats(home)
            entry = {"bytes": nbytes, "cp_sync_mb_s": nbytes / base / 1e6,
                     "blake3_mb_s": nbytes / hashed / 1e6,
                     "castore_offline_mb_s": nbytes / offline / 1e6,
                     "castore_daemon_mb_s": nbytes / daemon / 1e6,
                     "ratio_offline_vs_cp": base / offline, "ratio_daemon_vs_cp": base / daemon,
                     "cores_used_offline": statistics.median(off_cores),
                     "cores_used_daemon": statistics.median(d_cores),
                     "runs_s": {"cp": base_runs, "offline": off_runs, "daemon": d_runs},
                     "compression_ratio": float(st["compression_ratio"])}
            fig[label] = entry
            emit(figure=label, **{k: v for k, v in entry.items() if k != "runs_s"})
        (work / "copy.bin").unlink(missing_ok=True)
        if "small" in args.only:
            small_files(args, fig, tree, home, work)
        tree2 = work / "tree-v2"
        if "dedup" in args.only:
            shutil.rmtree(tree2, ignore_errors=True)
            mutate_tree(tree, tree2, 0.05)
        for level in ((1, 0) if "dedup" in args.only else ()):
            env = dict(os.environ, CASTORE_COMPRESSION_LEVEL=str(level))
            shutil.rmtree(home, ignore_errors=True)
            run(castore_cmd() + ["init", "--home", str(home)], env=env)
            run(castore_cmd() + ["add", "-q", "-r", "--home", str(home), "--to", "/v1",
                                 str(tree)], env=env)
            one = stats(home)
            run(castore_cmd() + ["add", "-q", "-r", "--home", str(home), "--to", "/v2",
                                 str(tree2)], env=env)
            two = stats(home)
            entry = {"compression_level": level, "logical_bytes": int(two["logical_bytes"]),
                     "stored_bytes_v1": int(one["stored_bytes"]),
                     "stored_bytes_v1_v2": int(two["stored_bytes"]),
                     "disk_bytes": int(two["disk_bytes"]),
                     "dedup_ratio": float(two["dedup_ratio"]),
                     "compression_ratio": float(two["compression_ratio"]),
                     "second_version_added_bytes": int(two["stored_bytes"]) -
                     int(one["stored_bytes"])}
            fig[f"dedup_level{level}"] = entry
            emit(figure=f"dedup_level{level}", **entry)
        path = write_json(name, results)
        plot(results, name)
        print(f"wrote {path}", file=sys.stderr)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def small_files(args: argparse.Namespace, fig: dict[str, Any], tree: Path, home: Path,
                work: Path) -> None:
    base, base_runs = median_of(args.runs, lambda i: cp_time(tree, work / "tree-copy"))
    offline, off_runs = median_of(args.runs, lambda i: add_time(tree, home, True, False))
    daemon, d_runs = median_of(args.runs, lambda i: add_time(tree, home, True, True))
    entry = {"files": args.files, "cp_sync_files_s": args.files / base,
             "castore_offline_files_s": args.files / offline,
             "castore_daemon_files_s": args.files / daemon,
             "ratio_offline_vs_cp": base / offline,
             "runs_s": {"cp": base_runs, "offline": off_runs, "daemon": d_runs}}
    fig["small_files"] = entry
    emit(figure="small_files", **{k: v for k, v in entry.items() if k != "runs_s"})
    shutil.rmtree(work / "tree-copy", ignore_errors=True)


def parts(text: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(chosen) - set(PARTS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"parts are {','.join(PARTS)}")
    return [p for p in PARTS if p in chosen]


def plot(results: dict[str, Any], name: str = "ingest") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig = results["figures"]
    fig_, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels, cp, off, dae = [], [], [], []
    for key in [k for k in ("large_incompressible", "large_compressible") if k in fig]:
        labels.append(key.replace("large_", ""))
        cp.append(fig[key]["cp_sync_mb_s"])
        off.append(fig[key]["castore_offline_mb_s"])
        dae.append(fig[key]["castore_daemon_mb_s"])
    x = range(len(labels))
    ax = axes[0]
    ax.bar([i - 0.27 for i in x], cp, 0.27, label="cp + fsync (baseline)")
    ax.bar(list(x), off, 0.27, label="castore add (offline)")
    ax.bar([i + 0.27 for i in x], dae, 0.27, label="castore add (daemon)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MB/s")
    ax.set_title("large file ingest")
    ax.legend(fontsize=8)
    s = fig.get("small_files")
    ax = axes[1]
    if s is not None:
        ax.bar(["cp -r + sync", "castore offline", "castore daemon"],
               [s["cp_sync_files_s"], s["castore_offline_files_s"], s["castore_daemon_files_s"]])
        ax.set_ylabel("files/s")
        ax.set_title(f"{s['files']} small files")
    fig_.tight_layout()
    out = Path(__file__).resolve().parent / "results" / f"{name}.png"
    fig_.savefig(out, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
