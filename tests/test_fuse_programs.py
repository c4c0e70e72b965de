"""Ordinary programs on the drive: cp -a, tar, rsync, git, sqlite3, fio --verify, and an
fsx-style random exerciser run against the drive and a local directory alike.

One daemon serves the module; each test uses its own directory of the drive.
"""
from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fuse_helpers import Drive, needs_fuse, run

pytestmark = [pytest.mark.fuse, needs_fuse, pytest.mark.timeout(300)]

DOC = Path("/usr/share/doc")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tree: part of /usr/share/doc (gzipped docs, symlinks), castore's own source,
    and some awkward entries."""
    root = tmp_path_factory.mktemp("source") / "tree"
    root.mkdir()
    count = 0
    (root / "doc").mkdir()
    for entry in sorted(DOC.iterdir()) if DOC.is_dir() else []:
        if count > 1200:
            break
        run(["cp", "-a", entry, root / "doc" / entry.name])
        count += 1 + sum(len(files) + len(dirs) for _, dirs, files in os.walk(entry))
    src = Path(__file__).resolve().parent.parent / "castore"
    shutil.copytree(src, root / "castore", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    odd = root / "odd"
    (odd / "empty dir").mkdir(parents=True)
    (odd / "spaces and ünïcödé.txt").write_text("unicode name\n")
    (odd / "zero").write_bytes(b"")
    (odd / "private").write_bytes(b"secret")
    os.chmod(odd / "private", 0o600)
    (odd / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(odd / "script.sh", 0o755)
    (odd / "big.bin").write_bytes(os.urandom(5 << 20) + bytes(1 << 20))
    os.symlink("script.sh", odd / "link-to-file")
    os.symlink("empty dir", odd / "link-to-dir")
    os.symlink("/nonexistent/target", odd / "dangling")
    os.utime(odd / "zero", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int, int, str]]:
    """(kind, permission bits, mtime in whole seconds, content hash or link target) per path."""
    out: dict[str, tuple[str, int, int, str]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", 0, 0, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), 0, "")
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime), digest)
    return out


def test_cp_a_in_and_out(here: Path, tree: Path, tmp_path: Path) -> None:
    run(["cp", "-a", tree, here / "tree"])
    run(["diff", "-r", "--no-dereference", tree, here / "tree"])
    run(["cp", "-a", here / "tree", tmp_path / "out"])
    run(["diff", "-r", "--no-dereference", tree, tmp_path / "out"])
    assert snapshot(tmp_path / "out") == snapshot(tree)
    assert snapshot(here / "tree") == snapshot(tree)


def test_tar_in_and_out(here: Path, tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "in.tar"
    run(["tar", "cf", archive, "-C", tree, "."])
    (here / "x").mkdir()
    run(["tar", "xf", archive, "-C", here / "x"])
    run(["diff", "-r", "--no-dereference", tree, here / "x"])
    run(["tar", "cf", tmp_path / "out.tar", "-C", here / "x", "."])
    (tmp_path / "back").mkdir()
    run(["tar", "xf", tmp_path / "out.tar", "-C", tmp_path / "back"])
    assert snapshot(tmp_path / "back") == snapshot(tree)


def test_rsync_a(here: Path, tree: Path) -> None:
    run(["rsync", "-a", f"{tree}/", f"{here}/r/"])
    run(["diff", "-r", "--no-dereference", tree, here / "r"])
    assert snapshot(here / "r") == snapshot(tree)
    again = run(["rsync", "-a", "--itemize-changes", f"{tree}/", f"{here}/r/"])
    assert again.stdout.strip() == "", again.stdout       # nothing left to transfer
    (tree / "odd" / "zero").write_bytes(b"changed")
    try:
        changed = run(["rsync", "-a", "--itemize-changes", f"{tree}/", f"{here}/r/"])
        assert "odd/zero" in changed.stdout
        assert (here / "r" / "odd" / "zero").read_bytes() == b"changed"
    finally:
        (tree / "odd" / "zero").write_bytes(b"")
        os.utime(tree / "odd" / "zero", ns=(1_500_000_000_000_000_000,) * 2)


def test_git(here: Path, tree: Path, tmp_path: Path) -> None:
    git = ["git", "-c", "user.name=castore", "-c", "user.email=castore@example.invalid",
           "-c", "init.defaultBranch=main", "-c", "gc.auto=0"]
    repo = here / "repo"
    run([*git, "init", "-q", repo])
    shutil.copytree(tree / "castore", repo / "castore")
    run([*git, "add", "-A"], cwd=repo)
    run([*git, "commit", "-q", "-m", "first"], cwd=repo)
    (repo / "castore" / "__init__.py").write_text("# edited\n")
    run([*git, "commit", "-q", "-am", "second"], cwd=repo)
    run([*git, "fsck", "--strict"], cwd=repo)
    log = run([*git, "log", "--oneline"], cwd=repo).stdout.splitlines()
    assert len(log) == 2
    run([*git, "clone", "-q", repo, here / "clone"])
    run([*git, "clone", "-q", repo, tmp_path / "local-clone"])
    run(["diff", "-r", tree / "castore" / "ops.py", here / "clone" / "castore" / "ops.py"])
    assert (tmp_path / "local-clone" / "castore" / "__init__.py").read_text() == "# edited\n"
    run([*git, "gc", "-q"], cwd=repo)
    run([*git, "fsck", "--strict"], cwd=repo)
    assert run([*git, "status", "--porcelain"], cwd=repo).stdout == ""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_sqlite3(here: Path, journal: str) -> None:
    db = here / "test.db"
    script = [f"PRAGMA journal_mode={journal};",
              "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB);",
              "CREATE INDEX t_name ON t(name);"]
    for batch in range(10):
        script.append("BEGIN;")
        for i in range(1000):
            n = batch * 1000 + i
            script.append(f"INSERT INTO t (name, blob) VALUES ('row {n}', randomblob({n % 700}));")
        script.append("COMMIT;")
    script.append("DELETE FROM t WHERE id % 7 = 0;")
    script.append("VACUUM;" if journal == "delete" else "PRAGMA wal_checkpoint(TRUNCATE);")
    run(["sqlite3", db], input="\n".join(script).encode(), timeout=240)
    out = run(["sqlite3", db, "PRAGMA integrity_check; SELECT count(*) FROM t;"]).stdout.split()
    assert out == ["ok", str(10_000 - 10_000 // 7)]


FIO = ["fio", "--ioengine=psync", "--fallocate=none", "--verify=crc32c",
       "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=terse",
       "--group_reporting"]


def test_fio_verify_sequential(here: Path) -> None:
    run([*FIO, "--name=seq", f"--filename={here / 'seq.fio'}", "--rw=write", "--bs=1M",
         "--size=256M"], cwd=here, timeout=280)


def test_fio_verify_random(here: Path) -> None:
    run([*FIO, "--name=rand", f"--filename={here / 'rand.fio'}", "--rw=randwrite",
         "--bs=16k", "--size=256M", "--io_size=48M", "--randseed=7"], cwd=here, timeout=280)


# -- fsx: the same random operations on the drive and on a local directory ---------------
class Side:
    """One of the two file systems being compared: a root and its open descriptors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: list[int | None] = []

    def path(self, name: str) -> Path:
        return self.root / name


def _fsx(drive_root: Path, local_root: Path, seed: int, steps: int,
         paranoid: bool = False) -> None:
    rnd = random.Random(seed)
    sides = [Side(drive_root), Side(local_root)]
    for s in sides:
        (s.root / "a").mkdir()
        (s.root / "b").mkdir()
    names = ["a/one", "a/two", "b/three", "b/four", "top"]
    log: list[str] = []

    def both(what: str, fn: object, same_value: bool = True) -> list[object]:
        results: list[object] = []
        for s in sides:
            try:
                results.append(("ok", fn(s)))  # type: ignore[operator]
            except OSError as exc:
                results.append(("err", exc.errno))
        log.append(what)
        compared = results if same_value else [r[0] for r in results]  # type: ignore[index]
        if compared[0] != compared[1]:
            raise AssertionError(f"seed {seed}, step {len(log)} ({what}): drive gave "
                                 f"{str(results[0])[:200]}, local gave {str(results[1])[:200]}"
                                 f"\nlast steps: {log[-12:]}")
        return results

    for _ in range(steps):
        op = rnd.random()
        open_fds = [i for i, fd in enumerate(sides[0].fds) if fd is not None]
        if op < 0.12 or not open_fds:
            name = rnd.choice(names)
            flags = os.O_RDWR | os.O_CREAT
            if rnd.random() < 0.15:
                flags |= os.O_TRUNC
            if rnd.random() < 0.15:
                flags |= os.O_APPEND
            res = both(f"open {name} {flags:#o}",
                       lambda s, n=name, f=flags: os.open(s.path(n), f, 0o644), False)
            for s, r in zip(sides, res):
                s.fds.append(r[1] if r[0] == "ok" else None)  # type: ignore[index]
            continue
        slot = rnd.choice(open_fds)
        if op < 0.45:
            off = rnd.choice([0, rnd.randrange(0, 1 << 20), rnd.randrange(0, 8 << 20)])
            data = rnd.randbytes(rnd.choice([1, 17, 4096, rnd.randrange(1, 300_000)]))
            both(f"pwrite fd{slot} @{off} +{len(data)}",
                 lambda s, o=off, d=data, i=slot: os.pwrite(s.fds[i], d, o))
        elif op < 0.50:
            data = rnd.randbytes(rnd.randrange(1, 70_000))
            both(f"write(append?) fd{slot} +{len(data)}",
                 lambda s, d=data, i=slot: os.write(s.fds[i], d))
        elif op < 0.72:
            off = rnd.randrange(0, 9 << 20)
            n = rnd.choice([1, 4096, rnd.randrange(1, 1 << 20)])
            both(f"pread fd{slot} @{off} {n}",
                 lambda s, o=off, k=n, i=slot: os.pread(s.fds[i], k, o))
        elif op < 0.78:
            n = rnd.choice([0, rnd.randrange(0, 64 << 10), rnd.randrange(0, 9 << 20)])
            both(f"ftruncate fd{slot} {n}", lambda s, k=n, i=slot: os.ftruncate(s.fds[i], k))
        elif op < 0.81:
            both(f"fstat fd{slot}", lambda s, i=slot: os.fstat(s.fds[i]).st_size)
        elif op < 0.83:
            both(f"fsync fd{slot}", lambda s, i=slot: os.fsync(s.fds[i]))
        elif op < 0.90:
            both(f"close fd{slot}", lambda s, i=slot: os.close(s.fds[i]))
            for s in sides:
                s.fds[slot] = None
        elif op < 0.94:
            src, dst = rnd.choice(names), rnd.choice(names)
            both(f"rename {src} {dst}",
                 lambda s, a=src, b=dst: os.rename(s.path(a), s.path(b)))
        elif op < 0.97:
            name = rnd.choice(names)
            both(f"unlink {name}", lambda s, n=name: os.unlink(s.path(n)))
        else:
            name = rnd.choice(names)
            n = rnd.randrange(0, 4 << 20)
            both(f"truncate {name} {n}", lambda s, nm=name, k=n: os.truncate(s.path(nm), k))
            both(f"stat {name}", lambda s, nm=name: os.stat(s.path(nm)).st_size)
        if paranoid:
            both("sizes of every open descriptor", lambda s: [
                os.fstat(fd).st_size if fd is not None else None for fd in s.fds])
    for s in sides:
        for fd in s.fds:
            if fd is not None:
                os.close(fd)
        s.fds = []
    for name in names:
        both(f"final read {name}", lambda s, n=name: s.path(n).read_bytes()
             if s.path(n).exists() else None)
    both("final listing", lambda s: sorted(str(p.relative_to(s.root))
                                           for p in s.root.rglob("*")))


def test_fsx_random_operations(here: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("CASTORE_FSX_SEED") or random.SystemRandom().randrange(1 << 32))
    steps = int(os.environ.get("CASTORE_FSX_STEPS") or 3000)
    print(f"fsx seed {seed} ({steps} steps; rerun with CASTORE_FSX_SEED={seed})")
    local = tmp_path / "local"
    local.mkdir()
    _fsx(here, local, seed, steps, paranoid=bool(os.environ.get("CASTORE_FSX_PARANOID")))


def test_fsx_after_remount(mounted: Drive, here: Path) -> None:
    """What the exerciser left on the drive reads back the same from a fresh daemon."""
    data = os.urandom(3 << 20)
    (here / "kept").write_bytes(data)
    mounted.stop()
    mounted.start()
    assert (here / "kept").read_bytes() == data


def test_diff_is_quiet_on_reread(here: Path, tree: Path) -> None:
    run(["cp", "-a", tree / "castore", here / "c"])
    for _ in range(2):
        out = subprocess.run(["diff", "-r", tree / "castore", here / "c"], capture_output=True)
        assert out.returncode == 0, out.stdout[-2000:]


def test_walks_during_changes_meet_no_errors_but_missing_names(here: Path) -> None:
    """Two threads walk a tree and read every file while two others create, write, edit,
    delete and move files and directories in it. A walk may find a name gone (ENOENT, or
    ESTALE from libfuse for a directory removed under it); nothing else goes wrong, on
    either side, and the tree reads back whole afterwards."""
    top = here / "t"
    top.mkdir()
    for i in range(12):
        (top / f"d{i}").mkdir()
        for j in range(8):
            (top / f"d{i}" / f"f{j}").write_bytes(os.urandom(1000 + j * 3000))
    stop = threading.Event()
    bad: list[str] = []

    def churn(seed: int) -> None:
        rnd = random.Random(seed)
        n = 0
        while not stop.is_set():
            n += 1
            d = top / f"d{rnd.randrange(12)}"
            op = rnd.randrange(6)
            try:
                names = [e.name for e in os.scandir(d) if e.is_file()]
                if op == 0:
                    (d / f"n{seed}-{n}").write_bytes(os.urandom(rnd.randrange(1, 300_000)))
                elif op == 1 and names:
                    os.unlink(d / rnd.choice(names))
                elif op == 2 and names:
                    os.rename(d / rnd.choice(names), top / f"d{rnd.randrange(12)}" /
                              f"m{seed}-{n}")
                elif op == 3 and names:
                    with open(d / rnd.choice(names), "r+b") as f:
                        f.write(b"edit")
                elif op == 4:
                    os.rename(d, top / f"x{seed}-{n}")
                    os.rename(top / f"x{seed}-{n}", d)
                elif op == 5:
                    sub = d / f"s{seed}-{n}"
                    sub.mkdir()
                    (sub / "a").write_bytes(b"a" * 5000)
                    (sub / "a").unlink()
                    sub.rmdir()
            except FileNotFoundError:
                pass                    # the other thread moved or removed it first
            except OSError as exc:
                bad.append(f"change: {exc!r}")

    def walk() -> None:
        while not stop.is_set():
            for path, _, files in os.walk(top):
                for name in files:
                    try:
                        with open(os.path.join(path, name), "rb") as f:
                            f.read()
                            os.fstat(f.fileno())
                    except (FileNotFoundError, NotADirectoryError):
                        pass
                    except OSError as exc:
                        if exc.errno != errno.ESTALE:
                            bad.append(f"walk: {exc!r}")

    threads = [threading.Thread(target=churn, args=(s,)) for s in (1, 2)] + \
        [threading.Thread(target=walk) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(5)
    stop.set()
    for t in threads:
        t.join(60)
    assert not bad, bad[:5]
    read = sum(len(p.read_bytes()) > 0 for p in top.rglob("*") if p.is_file())
    assert read >= 12 * 8 // 2
