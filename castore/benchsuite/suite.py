"""The standard suite: what runs in which order, and how each measurement becomes a figure
(castore's value, its baseline from the same run, and their ratio).

Order: ingest; the raw gRPC baseline; replicated writes at R = 1..N, each on a fresh cluster
of N peers; then on the cluster of R = --redundancy, whose first two peers have their drives
mounted: reads through the drive, propagation latency, small files, a join, and a kill -9 with
the time until the survivors hold R copies again. Everything started is ended in a finally.
"""
from __future__ import annotations

import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from castore import __version__
from castore.benchsuite import MiB, steps
from castore.benchsuite.cluster import CLUSTER_ENV, LocalCluster, free_port
from castore.benchsuite.processes import Processes, signals_ignored, signals_interrupt
from castore.benchsuite.progress import Steps
from castore.benchsuite.rawgrpc import RawGrpc
from castore.benchsuite.workloads import make_random_file
from castore.errors import UsageError

FORMAT = 1                   # version of the result file layout


@dataclass(frozen=True)
class Params:
    peers: int = 3
    redundancy: int = 2
    size_mib: int = 64
    runs: int = 3
    samples: int = 200           # propagation samples
    small_files: int = 1000      # 4 KiB files per small-file run
    down_out: float = 3.0        # --down-out-interval of the bench peers, seconds

    def check(self) -> None:
        if not 2 <= self.peers <= 8:
            raise UsageError("--peers must be between 2 and 8")
        if not 2 <= self.redundancy <= self.peers:
            raise UsageError(f"--redundancy must be between 2 and --peers ({self.peers}): "
                             "a kill -9 at R = 1 loses data")
        if self.size_mib < 1 or self.runs < 1 or self.samples < 1 or self.small_files < 1:
            raise UsageError("--size-mib, --runs, --samples and --small-files must be >= 1")
        if self.down_out <= 0:
            raise UsageError("--down-out-interval must be > 0")


@dataclass
class Figure:
    """One measured figure beside its baseline. ratio = value / baseline."""

    name: str
    title: str
    unit: str
    value: float
    baseline: float
    baseline_label: str
    better: str                  # "higher" or "lower"
    runs: list[float]
    baseline_runs: list[float]
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline if self.baseline else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 4)}

    def line(self) -> str:
        return (f"{fmt(self.value)} {self.unit} vs {fmt(self.baseline)} {self.unit} "
                f"{self.baseline_label} ({self.ratio:.3g}x)")


def fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def figure(name: str, title: str, unit: str, runs: list[float], baseline_runs: list[float],
           baseline_label: str, better: str = "higher", note: str = "") -> Figure:
    return Figure(name, title, unit, statistics.median(runs), statistics.median(baseline_runs),
                  baseline_label, better, [round(x, 4) for x in runs],
                  [round(x, 4) for x in baseline_runs], note)


def step_count(p: Params) -> int:
    return 2 + p.peers + 5          # ingest, raw, R sweep, read, latency, small, join, repair


class Suite:
    """One run of the suite in work (removed afterwards), results gathered in self.results."""

    def __init__(self, params: Params, work: Path, progress: Steps) -> None:
        self.p = params
        self.work = work
        self.progress = progress
        self.procs = Processes()
        self.figures: list[Figure] = []
        self.series: dict[str, Any] = {}
        self.size = params.size_mib * MiB

    def _step(self, label: str, fn: Callable[[], str]) -> None:
        with self.progress.step(label) as s:
            s.result(fn())

    def _add(self, f: Figure) -> str:
        self.figures.append(f)
        return f.line()

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        try:
            with signals_interrupt():
                self._run_all()
        finally:
            with signals_ignored():
                self.procs.stop_all()
        return {"format": FORMAT, "castore_version": __version__, "machine": machine(),
                "params": asdict(self.p), "cluster_env": CLUSTER_ENV,
                "seconds": round(time.monotonic() - started, 1),
                "figures": [f.as_dict() for f in in_order(self.figures)],
                "series": self.series}

    def _run_all(self) -> None:
        data_dir = self.work / "data"
        data_dir.mkdir(parents=True)
        data = []
        for i in range(self.p.runs):
            f = data_dir / f"data{i}.bin"
            make_random_file(f, self.size, seed=i + 1)
            data.append(f)
        self._step("ingest: castore add vs BLAKE3", lambda: self._ingest(data))
        self._step("raw gRPC baseline on loopback", self._raw)
        for r in range(1, self.p.peers + 1):
            if r != self.p.redundancy:
                self._step(f"replicated write R={r}", partial(self._write_fresh, r, data))
        root = self.work / f"cluster-r{self.p.redundancy}"
        with LocalCluster(self.procs, root, self.p.peers, self.p.redundancy, self.p.down_out,
                          mounted=(0, 1)) as c:
            self._step(f"replicated write R={self.p.redundancy}",
                       lambda: self._write(c, data))
            self._step("read through the drive", lambda: self._read(c, data))
            self._step("propagation latency", lambda: self._propagation(c))
            self._step("small files (4 KiB)", lambda: self._small(c))
            self._step("join: bytes moved", lambda: self._join(c))
            self._step("kill -9 and restore R copies", lambda: self._repair(c))

    # -- the steps ------------------------------------------------------------------------
    def _ingest(self, data: list[Path]) -> str:
        r = steps.ingest(self.work, data, self.size)
        return self._add(figure("ingest", "castore add (offline) vs BLAKE3 alone", "MB/s",
                                r["castore"], r["baseline"], "BLAKE3",
                                note="one file per run, page cache warm; includes CLI start"))

    def _raw(self) -> str:
        raw = RawGrpc(self.procs, free_port())
        try:
            self.raw_mb_s = [raw.stream_mb_s(self.size) for _ in range(self.p.runs)]
            self.raw_ping_ms = raw.ping_ms(max(self.p.samples, 100))
        finally:
            raw.close()
        self.series["raw_grpc_MBps"] = self.raw_mb_s
        self.series["raw_ping_ms"] = [round(x, 3) for x in self.raw_ping_ms]
        return (f"{fmt(statistics.median(self.raw_mb_s))} MB/s streamed, "
                f"{statistics.median(self.raw_ping_ms):.2f} ms round trip")

    def _write_fresh(self, r: int, data: list[Path]) -> str:
        with LocalCluster(self.procs, self.work / f"cluster-r{r}", self.p.peers, r) as c:
            return self._write(c, data)

    def _write(self, c: LocalCluster, data: list[Path]) -> str:
        w = steps.write_throughput(c, data, self.size, dest="/w")
        self.series.setdefault("writes", []).append(w)
        self.series["writes"].sort(key=lambda x: x["R"])
        r = c.redundancy
        self._add(figure(f"write_r{r}_placed", f"replicated write R={r}, every copy placed",
                         "MB/s", w["placed_MBps"], self.raw_mb_s, "raw gRPC",
                         note="castore add --wait, then until the replication queue is empty"))
        return self._add(figure(f"write_r{r}_ack", f"replicated write R={r}, W copies acked",
                                "MB/s", w["ack_MBps"], self.raw_mb_s, "raw gRPC",
                                note="castore add --wait (W = min(2, R) durable copies)"))

    def _read(self, c: LocalCluster, data: list[Path]) -> str:
        r = steps.mount_read(c.peers[0], data, "/w")
        note = "cold: page cache dropped before each read" if r["caches_dropped"] else \
            "page cache NOT dropped (needs root)"
        return self._add(figure("mount_read", "sequential read through the drive", "MB/s",
                                r["castore"], r["baseline"], "local disk", note=note))

    def _propagation(self, c: LocalCluster) -> str:
        ms = steps.propagation(c.peers[0], c.peers[1], self.p.samples)
        self.series["propagation_ms"] = [round(x, 3) for x in ms]
        ours, base = steps.latency_summary(ms), steps.latency_summary(self.raw_ping_ms)
        for q in ("p50", "p90", "p99"):
            self.figures.append(Figure(
                f"propagation_{q}", f"propagation latency {q} (close on A to listed on B)",
                "ms", round(ours[q], 3), round(base[q], 3), "raw gRPC round trip", "lower",
                [], [], note=f"{len(ms)} samples, one 4 KiB file every 100 ms"))
        return "  ".join(f"{q} {ours[q]:.0f} ms" for q in ("p50", "p90", "p99")) + \
            f" (raw gRPC p50 {base['p50']:.2f} ms)"

    def _small(self, c: LocalCluster) -> str:
        r = steps.small_files(c.peers[0], self.work / "local-small", self.p.small_files,
                              self.p.runs)
        return self._add(figure("small_files", "4 KiB files created through the drive",
                                "files/s", r["castore"], r["baseline"], "local disk",
                                note=f"{self.p.small_files} files per run; castore closes are "
                                     "journaled and committed in groups, the baseline has "
                                     "no fsync"))

    def _join(self, c: LocalCluster) -> str:
        j = steps.join_movement(c)
        self.series["join"] = j
        return self._add(Figure("join_moved", f"bytes moved when peer {j['peers_after']} "
                                "joins", "MiB", round(j["moved_bytes"] / MiB, 3),
                                round(j["ideal_bytes"] / MiB, 3), "ideal (total / N)", "lower",
                                [], [], note=f"settled in {j['seconds']:.1f} s"))

    def _repair(self, c: LocalCluster) -> str:
        # the peer without a drive (p0 and p1 have them) that holds the most data: with little
        # data a peer can hold none, and then there is nothing to restore
        victim = max(range(2, len(c.peers)), key=lambda i: c.peers[i].stored())
        r = steps.restore_after_kill(c, victim=victim)
        self.series["repair"] = r
        raw = statistics.median(self.raw_mb_s)
        ideal = r["lost_bytes"] / (raw * 1e6) if raw else 0.0
        self.figures.append(Figure(
            "repair_transfer", "restore R copies after kill -9: transfer", "s",
            round(r["transfer_s"], 3), float(f"{ideal:.3g}"), "lost bytes at raw gRPC speed",
            "lower",
            [], [], note=f"{r['lost_bytes'] / MiB:.1f} MiB lost; from the first repair transfer "
                         "queued to every copy back"))
        return self._add(Figure(
            "repair_total", "restore R copies after kill -9: total", "s",
            round(r["total_s"], 3), self.p.down_out, "down-out interval", "lower", [], [],
            note=f"detection {r['detection_s']:.1f} s + waiting {r['waiting_s']:.1f} s + "
                 f"settling {r['settling_s']:.1f} s + transfer {r['transfer_s']:.1f} s"))


def in_order(figures: list[Figure]) -> list[Figure]:
    """The figures as the report lists them: the writes by R (R = --redundancy is measured
    later than the others, on the cluster the other steps share), right after ingest."""
    writes = sorted((f for f in figures if f.name.startswith("write_r")),
                    key=lambda f: (int(f.name.split("_")[1][1:]), f.name.endswith("_placed")))
    rest = [f for f in figures if not f.name.startswith("write_r")]
    return rest[:1] + writes + rest[1:]


def machine() -> dict[str, Any]:
    import os
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_suite(params: Params, out: Path, progress: Steps, keep_work: bool = False
              ) -> dict[str, Any]:
    """Run the suite with its scratch space in out/work (removed afterwards unless keep_work;
    kept if a mount could not be undone, so that nothing is deleted through it)."""
    work = out / "work"
    work.mkdir(parents=True, exist_ok=False)
    suite = Suite(params, work, progress)
    try:
        return suite.run()
    finally:
        if suite.procs.mounted():
            progress.note(f"castore bench: still mounted, {work} kept: "
                          f"{', '.join(suite.procs.mounted())}")
        elif not keep_work:
            with signals_ignored():
                _keep_logs(work, out / "logs")
                _remove(work, progress)


def _remove(work: Path, progress: Steps, timeout: float = 10.0) -> None:
    """Remove the scratch space, again while something still ends in it (a process stopped
    by the interrupt may still be closing its files); say what is left after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        shutil.rmtree(work, ignore_errors=True)
        if not work.exists():
            return
        if time.monotonic() > deadline:
            left = sorted(str(p.relative_to(work)) for p in work.rglob("*"))[:5]
            progress.note(f"castore bench: could not remove {work}: {', '.join(left)}")
            return
        time.sleep(0.2)


def _keep_logs(work: Path, logs: Path) -> None:
    found = sorted(f for f in work.glob("cluster-*/*.log") if f.stat().st_size)
    if not found:
        return
    logs.mkdir(exist_ok=True)
    for f in found:
        shutil.copyfile(f, logs / f"{f.parent.name}-{f.name}")
