"""The measurements of the suite, each on a running LocalCluster (or a plain repo) and each with
its baseline taken right beside it. bench/replication.py runs the replicated-write, repair and
join measurements through these same functions."""
from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from castore.benchsuite import GiB
from castore.benchsuite.cluster import (CLI_TIMEOUT, BenchError, LocalCluster, LocalPeer, cli,
                                        wait_for)
from castore.benchsuite.workloads import (blake3_seconds, creates, drop_caches, percentile,
                                          read_file, timed)

PROPAGATION_TIMEOUT = 60.0   # seconds for one name to show up on the other peer
REPAIR_TIMEOUT = 600.0


# -- ingest -------------------------------------------------------------------------------
def ingest(work: Path, data: list[Path], size: int) -> dict[str, list[float]]:
    """MB/s of `castore add` into a fresh repo (offline: the CLI opens the repo itself) and of
    BLAKE3 alone over the same file, page cache warm for both, one file per run."""
    add, hashed = [], []
    home = work / "ingest-home"
    for f in data:
        shutil.rmtree(home, ignore_errors=True)
        cli(home, "init")
        f.read_bytes()                                   # warm the page cache for both
        hashed.append(size / blake3_seconds(f) / 1e6)
        add.append(size / timed(lambda: cli(home, "add", "-q", str(f))) / 1e6)
    shutil.rmtree(home, ignore_errors=True)
    return {"castore": add, "baseline": hashed}


# -- replicated writes --------------------------------------------------------------------
def write_throughput(c: LocalCluster, data: list[Path], size: int,
                     dest: str = "/") -> dict[str, Any]:
    """`castore add FILE --wait` on the first peer, one file per run: MB/s until W copies are
    acknowledged, and until every copy is placed (the replication queue is empty)."""
    acked, placed = [], []
    for f in data:
        start = time.perf_counter()
        c.add(f, dest=dest)
        t_ack = time.perf_counter() - start
        wait_for(c.queue_empty, CLI_TIMEOUT, "every copy sent", every=0.05)
        t_all = time.perf_counter() - start
        acked.append(size / t_ack / 1e6)
        placed.append(size / t_all / 1e6)
    return {"R": c.redundancy, "ack_MBps": acked, "placed_MBps": placed,
            "ack_median": statistics.median(acked), "placed_median": statistics.median(placed)}


# -- reads through the drive --------------------------------------------------------------
def mount_read(peer: LocalPeer, data: list[Path], dest: str) -> dict[str, Any]:
    """MB/s reading each file through the peer's drive (already added under dest) against
    reading the same file on local disk, the page cache dropped before each read."""
    assert peer.mount is not None
    castore, local = [], []
    dropped = True
    for f in data:
        dropped &= drop_caches()
        t, n = read_file(peer.mount / dest.strip("/") / f.name)
        castore.append(n / t / 1e6)
        dropped &= drop_caches()
        t, n = read_file(f)
        local.append(n / t / 1e6)
    return {"castore": castore, "baseline": local, "caches_dropped": dropped}


# -- propagation --------------------------------------------------------------------------
def propagation(a: LocalPeer, b: LocalPeer, samples: int, every: float = 0.1) -> list[float]:
    """Milliseconds from close() of a new file on a's drive until its name is listed on b's
    drive, for samples files written one every `every` seconds."""
    assert a.mount is not None and b.mount is not None
    src, dst = a.mount / "propagation", b.mount / "propagation"
    src.mkdir(exist_ok=True)
    wait_for(dst.is_dir, PROPAGATION_TIMEOUT, "the directory is on b")
    closed: dict[str, float] = {}
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        deadline = None
        while not done.is_set() or len(seen) < len(closed):
            now = time.perf_counter()
            for name in os.listdir(dst):
                seen.setdefault(name, now)
            if done.is_set():
                deadline = deadline or now + PROPAGATION_TIMEOUT
                if now > deadline:
                    return
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, name="castore-bench-watch", daemon=True)
    watcher.start()
    body = os.urandom(4096)
    try:
        for i in range(samples):
            name = f"f{i:05d}"
            with open(src / name, "wb") as fh:
                fh.write(body)
            closed[name] = time.perf_counter()
            time.sleep(every)
    finally:
        done.set()
        watcher.join(PROPAGATION_TIMEOUT + 5)
    missing = [n for n in closed if n not in seen]
    if missing:
        raise BenchError(f"{len(missing)} of {samples} files never showed up on the other peer "
                         f"within {PROPAGATION_TIMEOUT:.0f} s")
    return [max(0.0, (seen[n] - closed[n]) * 1e3) for n in closed]


def latency_summary(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


# -- small files --------------------------------------------------------------------------
def small_files(peer: LocalPeer, local: Path, count: int, runs: int) -> dict[str, list[float]]:
    """Files/s creating count 4 KiB files through the drive (closes are journaled, then committed in groups)
    against the same loop on local disk (no fsync)."""
    assert peer.mount is not None
    castore, base = [], []
    local.mkdir(parents=True, exist_ok=True)
    for run in range(runs):
        castore.append(count / creates(peer.mount / f"small-{run}", count, durable=False))
        base.append(count / creates(local / f"small-{run}", count, durable=False))
    return {"castore": castore, "baseline": base}


# -- join ---------------------------------------------------------------------------------
def settle(c: LocalCluster) -> None:
    """Repair passes on every peer until what each peer stores stops changing."""
    last: list[tuple[int, ...]] = [()]

    def steady() -> bool:
        for p in c.peers:
            p.repair()
        now = tuple(p.stored() for p in c.peers)
        same = now == last[0]
        last[0] = now
        return same
    wait_for(steady, REPAIR_TIMEOUT, "the cluster settles", every=0.5)


def join_movement(c: LocalCluster) -> dict[str, Any]:
    """Bytes moved when one more peer joins, against the ideal: the newcomer's fair share of
    every copy, total / (N + 1)."""
    settle(c)
    before = [p.stored() for p in c.peers]
    total = sum(before)
    start = time.perf_counter()
    newcomer = c.join()
    n = len(c.peers)
    wait_for(lambda: all(sum(s == "alive" for s in p.peer_states().values()) == n
                         for p in c.peers), 60, "every peer sees the newcomer alive")
    time.sleep(1.0)                                # the settle delay after a membership change
    settle(c)
    seconds = time.perf_counter() - start
    moved_in = newcomer.stored()
    grown = sum(max(0, p.stored() - b) for p, b in zip(c.peers, before))
    ideal = total / n
    return {"moved_bytes": moved_in + grown, "ideal_bytes": ideal,
            "ratio": (moved_in + grown) / ideal if ideal else 0.0,
            "old_peers_received": grown, "seconds": seconds, "peers_after": n}


# -- repair after kill -9 -----------------------------------------------------------------
@dataclass
class Timeline:
    """(seconds since the kill, under-replicated chunks, copies held) on the survivors."""

    points: list[tuple[float, int, int]] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)


def _sample(survivors: list[LocalPeer], pool: ThreadPoolExecutor) -> tuple[int, int, int]:
    """(under-replicated chunks, copies held, repair transfers queued or done) over the
    survivors."""
    rows = list(pool.map(lambda p: p.status(), survivors))
    return (sum(int(r["under_replicated"]) for r in rows),
            sum(int(r["stats"]["chunks"]) for r in rows),
            sum(int(r["repair_done"]) + int(r["repair_pending"]) for r in rows))


def restore_after_kill(c: LocalCluster, victim: int, every: float = 0.2) -> dict[str, Any]:
    """kill -9 one peer and time until the survivors hold every chunk's copies again, split
    into detection (dead), waiting (the down-out interval), settling (from "out" until a
    survivor has queued repair transfers: the repair loop's settle delay after a membership
    change and the listing of holdings) and transfer (from there until every copy is back);
    with the timeline of under-replicated chunks, sampled from the survivors' status every
    `every` seconds."""
    settle(c)
    total = sum(p.chunks() for p in c.peers)
    dead = c.peers[victim]
    lost = dead.stored()
    if not lost:
        raise BenchError("the peer to kill holds no data: use a larger --size-mib")
    vid = dead.status()["peer_id"]
    lost_copies = dead.chunks()
    survivors = [p for i, p in enumerate(c.peers) if i != victim]
    line = Timeline()
    with ThreadPoolExecutor(len(survivors)) as pool:
        done_before = _sample(survivors, pool)[2]
        t0 = time.perf_counter()
        dead.kill9(c.procs)
        deadline = t0 + REPAIR_TIMEOUT
        while True:
            now = time.perf_counter() - t0
            try:
                under, copies, done = _sample(survivors, pool)
                state = survivors[0].peer_states().get(vid, "")
            except Exception:               # a busy daemon: try again at the next tick
                under, copies, done, state = -1, -1, -1, ""
            if under >= 0:
                line.points.append((round(now, 3), under, copies))
            if state in ("dead", "out"):
                line.events.setdefault("dead", now)
            if state == "out":
                line.events.setdefault("out", now)
            if "out" in line.events and (done > done_before or copies > total - lost_copies):
                line.events.setdefault("started", now)
            if "out" in line.events and copies >= total:
                line.events.setdefault("started", now)
                line.events.setdefault("done", now)
            if "done" in line.events and (under == 0 or now > line.events["done"] + 10):
                break                      # the count only drops at the next repair pass
            if time.perf_counter() > deadline:
                raise BenchError(f"the survivors did not restore every copy within "
                                 f"{REPAIR_TIMEOUT:.0f} s")
            time.sleep(every)
    ev = line.events
    gib = lost / GiB
    transfer = ev["done"] - ev["started"]
    return {"lost_bytes": lost, "copies_total": total, "detection_s": ev["dead"],
            "waiting_s": ev["out"] - ev["dead"], "settling_s": ev["started"] - ev["out"],
            "transfer_s": transfer,
            "total_s": ev["done"],
            "transfer_s_per_GiB": transfer / gib if gib else 0.0,
            "total_s_per_GiB": ev["done"] / gib if gib else 0.0,
            "timeline": [list(p) for p in line.points], "events": dict(ev)}
