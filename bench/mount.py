"""Benchmark of the drive (castore daemon --mount) against the same work on local disk, measured
in the same run: sequential write and read of a large file (read back right after it was
written, cold and warm; incompressible and compressible), creating many small files, and tar x /
tar c of a source tree. tar c is also run through borg mount of an archive of the same tree,
when borg is installed: the anchor the drive's tree reading is held against.

    sudo /tmp/venv/bin/python bench/mount.py [--size 1024] [--runs 3] [--files 10000]
                                             [--only seq,creates,tar] [--no-borg]

Writes bench/results/mount.json and mount.png and prints one JSON line per figure. Cold reads
drop the page cache (echo 3 > /proc/sys/vm/drop_caches, root) for castore and the baseline
alike; castore's cold read is also the first read after a fresh mount. Every castore write is
durable when close returns, so the baseline of writes is fdatasync'd too (and reported both
ways for small files). Disk speed here varies a lot from minute to minute: compare the
castore/baseline ratios, measured side by side, more than the absolute figures.
"""
from __future__ import annotations

import argparse
import os
import random
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, castore_cmd, drop_caches, emit, machine, write_json  # noqa: E402

from castore import mounts  # noqa: E402
from castore.benchsuite.workloads import creates, read_file  # noqa: E402

MiB = 1 << 20
TARGETS = {           # DESIGN targets on this 2-core machine (see the issue)
    "seq_read_cold_incompressible": ("MB/s", 900), "seq_write_incompressible": ("MB/s", 350),
    "seq_write_compressible": ("MB/s", 350), "creates_4k": ("files/s", 1500),
    "tar_c": ("files/s", 7000)}


PARTS = ("seq", "creates", "tar")     # the groups of figures --only can pick


def parts(text: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in PARTS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"--only takes some of {','.join(PARTS)}")
    return out


class Daemon:
    """castore daemon --mount, started and stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.home, self.mnt = root / "home", root / "mnt"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*castore_cmd(), "daemon", "--home", str(self.home), "--mount", str(self.mnt)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            try:
                if mounts.state(str(self.mnt)) == "live":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the drive did not mount")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for args in (["-u"], ["-u", "-z"]):
            if mounts.find(str(self.mnt)) is None:
                break
            subprocess.run(["fusermount3", *args, str(self.mnt)], capture_output=True)

    def restart(self) -> None:
        self.stop()
        self.start()


# -- workloads ----------------------------------------------------------------------------
def write_file(path: Path, data: memoryview, durable: bool) -> float:
    """Seconds to write data in 1 MiB writes and close (plus fdatasync for local disk)."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i in range(0, len(data), MiB):
            os.write(fd, data[i:i + MiB])
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def make_data(kind: str, size: int, run: int, base: bytes | None) -> bytes:
    """Fresh bytes for each run (so no run deduplicates against an earlier one)."""
    if kind == "incompressible":
        return os.urandom(size)
    assert base is not None
    out = bytearray(base[:size])
    stamp = f"[run {run} {random.random():.12f}]".encode()
    for i in range(0, len(out), 64 << 10):
        out[i:i + len(stamp)] = stamp
    return bytes(out)


def compressible_base(size: int) -> bytes:
    """Real files from /usr (text, binaries, docs): zstd level 1 gets about 2-3x."""
    parts: list[bytes] = []
    have = 0
    for root in ("/usr/share", "/usr/lib", "/usr/bin", "/usr/include"):
        for dirpath, _, names in os.walk(root):
            for name in sorted(names):
                p = os.path.join(dirpath, name)
                try:
                    if os.path.islink(p) or not os.path.isfile(p):
                        continue
                    with open(p, "rb") as f:
                        data = f.read(size - have)
                except OSError:
                    continue
                parts.append(data)
                have += len(data)
                if have >= size:
                    return b"".join(parts)
    base = b"".join(parts)
    return (base * (size // max(1, len(base)) + 1))[:size]


def tar_x(archive: Path, dest: Path) -> float:
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(["tar", "xf", str(archive), "-C", str(dest)], check=True)
    return time.perf_counter() - start


def tar_c(src: Path) -> float:
    # through a pipe: GNU tar skips reading file data when its output is /dev/null
    start = time.perf_counter()
    tar = subprocess.Popen(["tar", "cf", "-", "-C", str(src), "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    while tar.stdout.read(MiB):
        pass
    if tar.wait() != 0:
        raise RuntimeError("tar c failed")
    return time.perf_counter() - start


class BorgMount:
    """borg mount of an archive of the tree (an anchor: borg's FUSE view of a backup), run in
    the foreground and stopped by PID. borg 1.2 (Debian: apt-get install borgbackup
    python3-pyfuse3) serves it through pyfuse3, libfuse's low-level API."""

    def __init__(self, borg: str, work: Path, tree: str) -> None:
        self.borg = borg
        self.repo = work / "borg-repo"
        self.mnt = work / "borg-mnt"
        self.mnt.mkdir()
        self.env = {**os.environ, "BORG_BASE_DIR": str(work / "borg-home"),
                    "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
                    "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        subprocess.run([borg, "init", "-e", "none", str(self.repo)], env=self.env,
                       check=True, capture_output=True)
        subprocess.run([borg, "create", f"{self.repo}::tree", "."], cwd=tree, env=self.env,
                       check=True, capture_output=True)

    def tar_c(self, entries: int) -> tuple[float, float]:
        """files/s of tar c through a fresh borg mount after drop_caches, then again."""
        drop_caches()
        proc = subprocess.Popen([self.borg, "mount", "-f", f"{self.repo}::tree", str(self.mnt)],
                                env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while not os.path.ismount(self.mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("borg mount did not come up")
                time.sleep(0.05)
            return entries / tar_c(self.mnt), entries / tar_c(self.mnt)
        finally:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def count_entries(root: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(root))


# -- the run ------------------------------------------------------------------------------
class Figures:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, name: str, unit: str, castore: list[float], baseline: list[float],
            note: str = "", **extra: Any) -> None:
        c, b = statistics.median(castore), statistics.median(baseline)
        item: dict[str, Any] = {"figure": name, "unit": unit, "castore": round(c, 1),
                                "baseline": round(b, 1), "ratio": round(c / b, 3) if b else None,
                                "castore_runs": [round(x, 1) for x in castore],
                                "baseline_runs": [round(x, 1) for x in baseline], **extra}
        if name in TARGETS:
            item["target"] = TARGETS[name][1]
        if note:
            item["note"] = note
        self.items.append(item)
        emit(**item)


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    figs = Figures()
    local = work / "local"
    local.mkdir()
    drive = Daemon(work / "castore")
    (work / "castore").mkdir()
    drive.start()
    cold_ok = drop_caches()
    size = args.size * MiB
    only = set(args.only)
    kinds = [k for k in ("incompressible", "compressible")
             if args.kind in ("both", k)] if "seq" in only else []
    try:
        base = compressible_base(size) if "compressible" in kinds else None
        for kind in kinds:
            w_c, w_b, r_cold_c, r_cold_b, r_warm_c, r_warm_b = [], [], [], [], [], []
            r_new_c: list[float] = []
            r_new_b: list[float] = []
            for run in range(args.runs):
                data = memoryview(make_data(kind, size, run, base))
                target = drive.mnt / f"{kind}-{run}.bin"
                w_c.append(size / MiB / write_file(target, data, durable=False))
                r_new_c.append(size / MiB / read_file(target)[0])
                w_b.append(size / MiB / write_file(local / f"{kind}.bin", data, durable=True))
                r_new_b.append(size / MiB / read_file(local / f"{kind}.bin")[0])
                del data
                drive.restart()                       # the first read after a mount
                drop_caches()
                t, n = read_file(target)
                assert n == size
                r_cold_c.append(size / MiB / t)
                r_warm_c.append(size / MiB / read_file(target)[0])
                drop_caches()
                t, _ = read_file(local / f"{kind}.bin")
                r_cold_b.append(size / MiB / t)
                r_warm_b.append(size / MiB / read_file(local / f"{kind}.bin")[0])
                os.unlink(target)
            figs.add(f"seq_write_{kind}", "MB/s", w_c, w_b,
                     "castore: write + close (journaled; large chunks durable); "
                     "local: write + fdatasync")
            figs.add(f"seq_read_written_{kind}", "MB/s", r_new_c, r_new_b,
                     "read back right after it was written, same mount")
            figs.add(f"seq_read_cold_{kind}", "MB/s", r_cold_c, r_cold_b,
                     "after a fresh mount and drop_caches" if cold_ok else "caches NOT dropped")
            figs.add(f"seq_read_warm_{kind}", "MB/s", r_warm_c, r_warm_b, "second read")
        del base
        if "creates" in only:
            creates_figure(args, figs, drive, local)
        if "tar" in only:
            tar_figures(args, figs, drive, local, work)
    finally:
        drive.stop()
    return {"machine": machine(), "size_mib": args.size, "runs": args.runs,
            "files": args.files, "caches_dropped": cold_ok, "only": sorted(only),
            "figures": figs.items}


def creates_figure(args: argparse.Namespace, figs: Figures, drive: Daemon, local: Path
                   ) -> None:
    c_c, c_b, c_bd = [], [], []
    for run in range(args.runs):
        c_c.append(args.files / creates(drive.mnt / f"many-{run}", args.files, False))
        c_b.append(args.files / creates(local / f"many-{run}", args.files, False))
        c_bd.append(args.files / creates(local / f"many-sync-{run}", min(args.files, 2000),
                                         True) * min(args.files, 2000) / args.files)
    figs.add("creates_4k", "files/s", c_c, c_b,
             "create, write 4 KiB, close; castore closes are journaled and committed in groups; "
             "baseline without fsync", baseline_fsync=round(statistics.median(c_bd), 1))


def tar_figures(args: argparse.Namespace, figs: Figures, drive: Daemon, local: Path,
                work: Path) -> None:
    archive = work / "tree.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", args.tree, "."], check=True)
    entries = count_entries(Path(args.tree))
    x_c, x_b, cw_c, cw_b, cc_c, cc_b = [], [], [], [], [], []
    for run in range(args.runs):
        x_c.append(entries / tar_x(archive, drive.mnt / f"tree-{run}"))
        x_b.append(entries / tar_x(archive, local / f"tree-{run}"))
        cw_c.append(entries / tar_c(drive.mnt / f"tree-{run}"))
        cw_b.append(entries / tar_c(local / f"tree-{run}"))
    cc2_c, cc2_b = [], []
    for run in range(args.runs):
        drive.stop()             # as borg's below: caches dropped, then a fresh mount
        drop_caches()
        drive.start()
        cc_c.append(entries / tar_c(drive.mnt / f"tree-{run}"))
        cc2_c.append(entries / tar_c(drive.mnt / f"tree-{run}"))
        drop_caches()
        cc_b.append(entries / tar_c(local / f"tree-{run}"))
        cc2_b.append(entries / tar_c(local / f"tree-{run}"))
    borg = shutil.which("borg") if args.borg else None
    anchor: dict[str, dict[str, Any]] = {"cold": {}, "again": {}}
    if borg is None:
        print("bench: borg is not installed (apt-get install borgbackup python3-pyfuse3): "
              "no borg mount figures", file=sys.stderr)
    else:
        bm = BorgMount(borg, work, args.tree)
        runs = [bm.tar_c(entries) for _ in range(args.runs)]
        for key, i in (("cold", 0), ("again", 1)):
            anchor[key] = {"borg": round(statistics.median(r[i] for r in runs), 1),
                           "borg_runs": [round(r[i], 1) for r in runs]}
    figs.add("tar_x", "files/s", x_c, x_b, f"{entries} entries from {args.tree}")
    figs.add("tar_c", "files/s", cw_c, cw_b, "right after tar x (kernel caches warm)")
    figs.add("tar_c_cold", "files/s", cc_c, cc_b, "after a fresh mount and drop_caches; "
             "borg: borg mount of an archive of the same tree, the same way", **anchor["cold"])
    figs.add("tar_c_cold_again", "files/s", cc2_c, cc2_b, "the same tar c once more "
             "(page cache and daemon warm)", **anchor["again"])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [("MB/s", "sequential I/O (MB/s)"), ("files/s", "metadata-heavy work (files/s)")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, (unit, title) in zip(axes, groups):
        items = [f for f in result["figures"] if f["unit"] == unit]
        xs = range(len(items))
        ax.bar([x - 0.2 for x in xs], [f["castore"] for f in items], 0.4, label="castore drive")
        ax.bar([x + 0.2 for x in xs], [f["baseline"] for f in items], 0.4, label="local disk")
        borg = [(x, f["borg"]) for x, f in zip(xs, items) if f.get("borg")]
        if borg:
            ax.plot([x for x, _ in borg], [v for _, v in borg], "k*", markersize=10,
                    label="borg mount (same tree)")
        for x, f in zip(xs, items):
            if f.get("target"):
                ax.plot([x - 0.4, x + 0.4], [f["target"]] * 2, "r--", linewidth=1)
            if f.get("ratio") is not None:
                ax.annotate(f"{f['ratio']:.2f}x", (x - 0.2, f["castore"]), ha="center",
                            va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f["figure"].replace("_", "\n", 2) for f in items], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"castore drive vs local disk, median of {result['runs']} runs "
                 f"({result['size_mib']} MiB files; red: targets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024, help="MiB per large file (default 1024)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--files", type=int, default=10_000, help="small files to create")
    p.add_argument("--tree", default="/usr/share/doc", help="source tree for tar x / tar c")
    p.add_argument("--no-borg", dest="borg", action="store_false",
                   help="skip the borg mount figures of tar c (measured when borg is installed)")
    p.add_argument("--kind", choices=("both", "incompressible", "compressible"),
                   default="both", help="data of the sequential figures (default: both)")
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir in /tmp)")
    p.add_argument("--only", default=",".join(PARTS), type=parts,
                   help=f"comma-separated figures to measure, of {','.join(PARTS)} (default: "
                        "all); a partial run writes mount-ONLY.json instead of mount.json")
    p.add_argument("--out", default=None, help="name of the result files (default: mount, "
                   "or mount-ONLY for a partial run)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="castore-bench-mount-", dir=args.dir))
    try:
        result = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = args.out or ("mount" if set(args.only) == set(PARTS) else
                        "mount-" + "-".join(sorted(args.only)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(name, result)
    plot(result, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.png')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
