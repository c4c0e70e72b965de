"""Bad input loses nothing: store faults done for real, on real LMDB files and processes.

A byte flipped in data.mdb, kill -9 of `castore add` and of the daemon in the middle of an
add, a 1 MiB initial map, and a 64 MiB tmpfs that fills up. After each: what was acknowledged
("added <id> <path>" printed) reads back exactly, and what is broken is reported, never
returned. Random choices derive from CASTORE_SEED (printed; set it to replay a run).
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from daemon_helpers import (CASTORE, EXIT_DISK_FULL, EXIT_INTEGRITY, EXIT_NOT_FOUND,
                            EXIT_PROBLEMS, EXIT_UNAVAILABLE, Daemon, added_lines,
                            assert_user_error, cli_env, make_file, make_tree, run, run_json,
                            running_daemon, start_process, stop_process, tmpfs)

from castore import chunking
from castore import repo as repo_module
from castore.config import Config
from castore.ids import ChunkId
from castore.repo import Repo

SEED = int(os.environ.get("CASTORE_SEED", "20261201"))
MiB = 1 << 20


def rng_for(name: str) -> random.Random:
    print(f"CASTORE_SEED={SEED} ({name})")
    return random.Random(f"{SEED}:{name}")


@contextmanager
def maybe_daemon(home: Path, mode: str, log: Path | None = None) -> Iterator[Daemon | None]:
    if mode == "daemon":
        with running_daemon(home, log=log) as d:
            yield d
            assert d.alive(), d.log_text()
    else:
        yield None


def check_acked(home: Path, acked: dict[str, tuple[str, bytes]],
                read_ids: set[str] | None = None) -> None:
    """Each acknowledged path names its id, and each id reads back as exactly its bytes.
    Ids in read_ids were read back before (and `castore verify` re-hashes every chunk since):
    they are not read again; newly read ones are added. The repo is opened in this process,
    so no daemon may be running."""
    read_ids = set() if read_ids is None else read_ids
    by_dir: dict[str, list[str]] = {}
    for path in acked:
        by_dir.setdefault(path.rsplit("/", 1)[0] or "/", []).append(path)
    with Repo.open(Config.load(home, env={})) as repo:
        for parent, paths in by_dir.items():
            listed = {e.path: e.content for e in repo.listdir(parent)}
            for path in paths:
                assert listed.get(path) == acked[path][0], path
        for path, (cid, data) in acked.items():
            if cid not in read_ids:
                assert b"".join(repo.read(cid)) == data, path
                read_ids.add(cid)


def _find_all(blob: bytes, marker: bytes) -> list[int]:
    out, i = [], blob.find(marker)
    while i >= 0:
        out.append(i)
        i = blob.find(marker, i + 1)
    return out


# -- a flipped byte -----------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["offline", "daemon"])
def test_flipped_byte_in_data_mdb_is_caught(tmp_path: Path, mode: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("compression_level = 0\n")   # the marker stays visible
    run("init", home=home)
    src = tmp_path / "src"
    one = make_file(src / "one", 60_000, seed=1, marker=b"<<CASTORE-FLIP-ONE-7d1e>>")
    long = make_file(src / "long", 3 * MiB, seed=2)
    at = len(long) - 50_000                                          # in the last chunk
    mark2 = b"<<CASTORE-FLIP-LONG-9a2c>>"
    long = long[:at] + mark2 + long[at + len(mark2):]
    (src / "long").write_bytes(long)
    small = make_file(src / "small", 3000, seed=3)
    mid = make_file(src / "mid", MiB, seed=4)
    one_id = ChunkId.of(one)
    cuts = list(chunking.cut(long))
    assert len(cuts) > 1
    long_bad = next(ChunkId.of(long[o:o + n]) for o, n in cuts if o <= at < o + n)

    with maybe_daemon(home, mode):
        added = added_lines(run("add", "-r", src, home=home).stdout)
        assert added["/src/one"] == one_id.hex
        blob = (home / "store" / "data.mdb").read_bytes()
        fd = os.open(home / "store" / "data.mdb", os.O_RDWR)
        try:
            for marker in (b"<<CASTORE-FLIP-ONE-7d1e>>", mark2):
                offsets = _find_all(blob, marker)
                assert offsets, f"{marker!r} not found in data.mdb"
                for off in offsets:
                    os.pwrite(fd, bytes([blob[off + 5] ^ 0x20]), off + 5)
            os.fsync(fd)
        finally:
            os.close(fd)

        for target in ("/src/one", one_id.hex):
            proc = run("cat", target, home=home, check=False, binary=True)
            assert proc.stdout == b"", "wrong bytes reached stdout"
            assert_user_error(proc, EXIT_INTEGRITY, one_id.hex)
        proc = run("cat", "/src/long", home=home, check=False, binary=True)
        assert_user_error(proc, EXIT_INTEGRITY, long_bad.hex)
        assert len(proc.stdout) < len(long) and long.startswith(proc.stdout)   # a true prefix
        proc = run("get", "/src/one", tmp_path / "got", home=home, check=False)
        assert_user_error(proc, EXIT_INTEGRITY, one_id.hex)
        assert not [n for n in os.listdir(tmp_path) if n.startswith("got")]   # no partial file

        proc = run("verify", home=home, check=False)
        assert proc.returncode == EXIT_PROBLEMS, proc.stdout + proc.stderr
        corrupt = sorted(line.split()[1] for line in proc.stdout.splitlines()
                         if line.startswith("corrupt "))
        assert corrupt == sorted([one_id.hex, long_bad.hex]), proc.stdout
        report = run_json("verify", home=home, check=False)
        assert report["ok"] is False and sorted(report["corrupt"]) == corrupt
        assert report["missing"] == []
        # Everything else still reads back exactly.
        assert run("cat", "/src/small", home=home, binary=True).stdout == small
        assert run("cat", added["/src/mid"], home=home, binary=True).stdout == mid


# -- kill -9 ------------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def kill9(proc: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL one process; its children (worker processes) must go by themselves within a
    few seconds. Returns those that did not (killed here, by PID)."""
    kids = _descendants(proc.pid)
    stop_process(proc, signal.SIGKILL)
    until = time.monotonic() + 5
    while time.monotonic() < until and any(_running(k) for k in kids):
        time.sleep(0.05)
    stuck = [k for k in kids if _running(k)]
    for k in stuck:
        os.kill(k, signal.SIGKILL)
    return stuck


BATCH_FILES = getattr(repo_module, "BATCH_FILES", 2000)   # small files per commit


@pytest.fixture(scope="module")
def base_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """Enough small files for at least two commits of one add (so its "added" lines come out
    in two groups or more, whatever the speed of the machine). Made once: creating files is
    the slow part here."""
    tree = make_tree(tmp_path_factory.mktemp("kill9") / "base", seed=SEED,
                     n_files=BATCH_FILES + 300, max_size=2 << 10, n_dirs=6, n_symlinks=1)
    return tree.root, tree.files


def _round(tmp_path: Path, base: tuple[Path, dict[str, bytes]], i: int
           ) -> tuple[list[Path], dict[str, bytes]]:
    """What round i adds under /i<i>: the base tree, and two new large files (new chunks,
    stored through the chunk pipeline; large enough that an add is still busy with them a
    while after its first acknowledged group)."""
    fresh = tmp_path / f"new{i}"
    big = {name: make_file(fresh / name, (17 << 20) + k, seed=SEED * 100 + i * 10 + k)
           for k, name in enumerate(("big-a", "big-b"))}
    files = {f"/i{i}/base/{rel}": data for rel, data in base[1].items()}
    files.update({f"/i{i}/new{i}/{name}": data for name, data in big.items()})
    return [base[0], fresh], files


def _start_add(home: Path, srcs: list[Path], i: int, out: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as f:
        return start_process(CASTORE + ["add", "--home", str(home), "-r", *map(str, srcs),
                                        "--to", f"/i{i}"], stdout=f, stderr=subprocess.PIPE,
                             env=cli_env())


def _aim(rng: random.Random, proc: subprocess.Popen[bytes], out: Path, span: float,
         after_ack: bool) -> str:
    """Wait for a random moment of an add: a time into it (from start-up on), or with
    after_ack a little after its first acknowledged group. Returns how it was aimed."""
    if not after_ack:
        time.sleep(rng.uniform(0.3, 1.0) * span)
        return "time"
    until = time.monotonic() + 60
    while proc.poll() is None and b"\n" not in out.read_bytes() and time.monotonic() < until:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05) * span)
    return "after-first-ack"


@pytest.mark.timeout(240)
def test_kill9_of_an_offline_add_loses_nothing_acknowledged(
        tmp_path: Path, base_tree: tuple[Path, dict[str, bytes]]) -> None:
    rng = rng_for("kill9-offline")
    home = tmp_path / "home"
    run("init", home=home)
    acked: dict[str, tuple[str, bytes]] = {}
    read_ids: set[str] = set()
    # Round 0 runs to the end: it measures how long an add takes here, to aim the kills.
    src, files = _round(tmp_path, base_tree, 0)
    started = time.monotonic()
    proc = _start_add(home, src, 0, tmp_path / "out0")
    try:
        assert proc.wait(120) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        stop_process(proc)
    span = time.monotonic() - started
    lines = added_lines((tmp_path / "out0").read_text())
    assert sorted(lines) == sorted(files)
    acked.update({p: (cid, files[p]) for p, cid in lines.items()})
    midway = 0
    summary = []
    after_ack = set(rng.sample(range(1, 11), 5))
    for i in range(1, 11):
        src, files = _round(tmp_path, base_tree, i)
        out = tmp_path / f"out{i}"
        proc = _start_add(home, src, i, out)
        try:
            how = _aim(rng, proc, out, span, i in after_ack)
            stuck = kill9(proc)
        finally:
            stop_process(proc)
        assert stuck == [], f"round {i}: processes left behind by a killed add: {stuck}"
        lines = added_lines(out.read_text(errors="replace"))
        assert set(lines) <= set(files)
        acked.update({p: (cid, files[p]) for p, cid in lines.items()})
        midway += proc.returncode == -signal.SIGKILL and 0 < len(lines) < len(files)
        summary.append((i, how, proc.returncode, len(lines)))
        # The repo reopens cleanly, and everything acknowledged so far is intact.
        verify = run("verify", home=home, check=False)
        assert verify.returncode == 0, (summary, verify.stdout, verify.stderr)
        assert run_json("status", home=home)["daemon"] == "stopped"
        if lines and i % 2:
            path = rng.choice(sorted(lines))
            assert run("cat", lines[path], home=home, binary=True).stdout == files[path]
        check_acked(home, {p: acked[p] for p in lines}, read_ids)
    check_acked(home, acked, read_ids)              # every round's, after all the kills
    print(f"add takes {span:.2f} s; rounds (i, aim, rc, acked of {len(files)}):", summary)
    assert midway >= 3, f"too few kills landed mid-add: {summary}"
    # Writes go on: the last, interrupted tree adds completely now.
    lines = added_lines(run("add", "-r", *src, "--to", f"/i{i}", home=home).stdout)
    assert sorted(lines) == sorted(files)
    assert all(acked.get(p, (cid,))[0] == cid for p, cid in lines.items())


@pytest.mark.timeout(240)
def test_kill9_of_the_daemon_mid_add_loses_nothing_acknowledged(
        tmp_path: Path, base_tree: tuple[Path, dict[str, bytes]]) -> None:
    rng = rng_for("kill9-daemon")
    home = tmp_path / "home"
    acked: dict[str, tuple[str, bytes]] = {}
    summary = []
    d = Daemon(home)
    try:
        d.start()
        for i in range(3):
            src, files = _round(tmp_path, base_tree, i)
            out = tmp_path / f"out{i}"
            client = _start_add(home, src, i, out)
            try:
                how = _aim(rng, client, out, 0.5, after_ack=i > 0)
                assert d.proc is not None
                stuck = kill9(d.proc)
                assert stuck == [], f"left behind by the killed daemon: {stuck}"
                rc = client.wait(30)          # the client must not hang
                err = client.stderr.read().decode() if client.stderr else ""
            finally:
                stop_process(client)
            lines = added_lines(out.read_text(errors="replace"))
            summary.append((i, how, rc, len(lines)))
            assert set(lines) <= set(files)
            acked.update({p: (cid, files[p]) for p, cid in lines.items()})
            if rc != 0:
                assert rc == EXIT_UNAVAILABLE, err
                assert len(err.splitlines()) == 1, err
                assert err.startswith("castore: error: ") and "Traceback" not in err
            # A new daemon starts over the stale socket; the repo verifies clean through it.
            assert (home / "castore.sock").exists()
            d = Daemon(home)
            d.start()
            verify = run_json("verify", home=home, check=False)
            assert verify["ok"] is True, verify
            if lines:
                path = rng.choice(sorted(lines))
                assert run("cat", path, home=home, binary=True).stdout == files[path]
        assert d.stop() == 0, d.log_text()
    finally:
        d.stop()
    print("rounds (i, aim, client rc, acked):", summary)
    assert any(rc != 0 and n > 0 for _, _, rc, n in summary), summary    # killed mid-add
    check_acked(home, acked)


# -- a small map --------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_1mib_map_grows_to_hold_50mib(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("map_size = 1048576\n")
    run("init", home=home)
    tree = make_tree(tmp_path / "src", seed=50, n_files=80, max_size=400 << 10,
                     big=[30 * MiB])
    total = sum(map(len, tree.files.values()))
    assert total > 45 * MiB
    added = added_lines(run("add", "-r", tree.root, home=home).stdout)
    assert len(added) == len(tree.files)
    status = run_json("status", home=home)
    assert int(status["stats"]["map_size"]) > 45 * MiB          # grew from 1 MiB
    run("get", "/src", tmp_path / "out", home=home)
    for rel, data in tree.files.items():
        assert (tmp_path / "out" / rel).read_bytes() == data
    # The daemon opens with the same 1 MiB setting and grows the map itself as it writes.
    more = make_file(tmp_path / "more", 12 * MiB, seed=51)
    with running_daemon(home):
        added = added_lines(run("add", tmp_path / "more", home=home).stdout)
        assert run("cat", added["/more"], home=home, binary=True).stdout == more
        status = run_json("status", home=home)
        assert int(status["stats"]["map_size"]) > total + 12 * MiB
        assert int(status["stats"]["files"]) == len(tree.files) + 1


# -- a full disk --------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["offline", "daemon"])
def test_full_disk_fails_cleanly_and_recovers(tmp_path: Path, mode: str) -> None:
    small = make_file(tmp_path / "small", 2 * MiB, seed=60)
    big = make_file(tmp_path / "big", 40 * MiB, seed=61)
    with tmpfs(tmp_path / "fs", "64m") as fs:
        home = fs / "home"
        run("init", home=home)
        ballast = fs / "ballast"
        ballast.write_bytes(bytes(32 * MiB))       # space to give back later
        with maybe_daemon(home, mode, log=tmp_path / "daemon.log") as d:   # log off the tmpfs
            first = added_lines(run("add", tmp_path / "small", home=home).stdout)
            proc = run("add", tmp_path / "big", home=home, check=False)
            assert_user_error(proc, EXIT_DISK_FULL, "disk full")
            assert added_lines(proc.stdout) == {}
            assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize < 8 * MiB   # really full
            if d is not None:
                assert d.alive(), d.log_text()
                assert run_json("status", home=home)["pid"] == d.pid
            # Nothing committed is lost; reads go on; the failed file is not there.
            assert run("cat", first["/small"], home=home, binary=True).stdout == small
            assert run_json("verify", home=home)["ok"] is True
            assert_user_error(run("stat", "/big", home=home, check=False), EXIT_NOT_FOUND)
            # Space comes back: the same add now succeeds, with no restart.
            ballast.unlink()
            done = added_lines(run("add", tmp_path / "big", home=home).stdout)
            assert set(done) == {"/big"}
            assert run("cat", "/big", home=home, binary=True).stdout == big
            if d is not None:
                assert d.alive() and "Traceback" not in d.log_text(), d.log_text()


def test_a_write_stuck_behind_a_stalled_one_times_out_and_writes_nothing(tmp_path: Path) -> None:
    """A commit that never finishes (a stalled disk) holds the one writer: the next write
    gives up with a deadline error after its wait, and the store works once the stall ends."""
    import threading

    from castore.errors import DeadlineError
    from castore.store.lmdb import LmdbEnv
    env = LmdbEnv(tmp_path / "env")
    try:
        env.write_wait = 0.5
        stalled, release = threading.Event(), threading.Event()

        def stall(t: object) -> None:
            stalled.set()
            assert release.wait(30)
        holder = threading.Thread(target=env.write, args=(stall,))
        holder.start()
        try:
            assert stalled.wait(10)
            started = time.monotonic()
            with pytest.raises(DeadlineError, match="waited"):
                env.write(lambda t: t.put("meta", b"test-late", b"1"))
            assert time.monotonic() - started < 5
        finally:
            release.set()
            holder.join(30)
        assert env.read(lambda t: t.get("meta", b"test-late")) is None, "the timed-out write landed"
        env.write(lambda t: t.put("meta", b"test-after", b"1"))
        assert env.read(lambda t: bytes(t.get("meta", b"test-after"))) == b"1"
    finally:
        env.close()
