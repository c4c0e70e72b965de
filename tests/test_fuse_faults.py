"""The drive under faults: the daemon SIGKILLed under the mount, a corrupted chunk, stopping by
signal (idle and busy), `castore umount`, and memory while a large file is written."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from castore import mounts
from fuse_helpers import Drive, castore, drive, needs_fuse, oserror
from pagecache import drop_pages, resident_fraction

pytestmark = [pytest.mark.fuse, needs_fuse, pytest.mark.timeout(180)]
PROMPT = 5.0          # seconds within which a caller must get its error


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _timed_errno(fn: object, *args: object) -> tuple[int, float]:
    t = time.monotonic()
    code = oserror(fn, *args)
    return code, time.monotonic() - t


def test_sigkill_then_restart_over_the_stale_mount(tmp_path: Path) -> None:
    d = Drive(tmp_path).start()
    held: int | None = None
    try:
        files = {"small": os.urandom(1000), "medium": os.urandom(3 << 20),
                 "large": os.urandom(40 << 20)}
        (d.path("dir")).mkdir()
        for name, data in files.items():
            d.path("dir", name).write_bytes(data)
        d.path("dir", "edited").write_bytes(b"committed version")
        writer = os.open(d.path("dir", "edited"), os.O_WRONLY | os.O_TRUNC)
        os.write(writer, b"never closed " * 1000)
        partial = os.open(d.path("dir", "partial"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(partial, os.urandom(20 << 20))               # streams, never closed
        held = os.open(d.path("dir", "large"), os.O_RDONLY)
        os.posix_fadvise(held, 0, 0, os.POSIX_FADV_DONTNEED)   # the pages its writes left
        assert len(os.read(held, 4096)) == 4096
        d.kill()
        # (bytes the kernel already cached may still read: ask for some far from them)
        for fn, args in [(os.pread, (held, 4096, 39 << 20)), (os.statvfs, (d.mnt,)),
                         (os.stat, (d.path("dir", "never-looked-up"),)),
                         (os.listdir, (d.path("dir"),)), (os.write, (writer, b"x"))]:
            code, took = _timed_errno(fn, *args)
            assert code in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED), \
                f"{fn.__name__}: {errno.errorcode.get(code, code)}"
            assert took < PROMPT
        assert mounts.state(str(d.mnt)) == "stale"
        for fd in (writer, partial):
            oserror(os.close, fd)
        d2 = Drive(tmp_path)                 # same home, same mountpoint
        d2.start()                           # cleans the stale mount (busy: held is open)
        try:
            for name, data in files.items():
                assert _sha(d2.path("dir", name)) == hashlib.sha256(data).hexdigest(), name
            assert d2.path("dir", "edited").read_bytes() == b"committed version"
            assert not d2.path("dir", "partial").exists()
            assert sorted(os.listdir(d2.path("dir"))) == ["edited", "large", "medium", "small"]
            out = castore("verify", "--json", home=d2.home)
            assert json.loads(out.stdout)["ok"] is True
        finally:
            d2.stop()
    finally:
        if held is not None:
            oserror(os.close, held)
        d.stop()


def test_every_returned_close_survives_sigkill(tmp_path: Path) -> None:
    """close() returns once the file is in the close journal; the group commit follows.
    So do chmod and utime right after the close (as rsync sets them). SIGKILL right after
    many closes: the restarted daemon has every one of them, with its mode and time."""
    d = Drive(tmp_path).start()
    files = {f"f{i:04d}": os.urandom(64 + i) for i in range(1500)}

    def attrs(i: int) -> tuple[int, int]:
        return (0o600 if i % 2 else 0o640), (1_600_000_000 + i) * 10**9
    try:
        d.path("many").mkdir()
        for i, (name, data) in enumerate(files.items()):
            with open(d.path("many", name), "wb") as f:
                f.write(data)
            if i % 3 == 0:
                mode, mtime = attrs(i)
                os.utime(d.path("many", name), ns=(mtime, mtime))
                os.chmod(d.path("many", name), mode)
        d.kill()
    finally:
        d.stop()
    d2 = Drive(tmp_path).start()
    try:
        assert sorted(os.listdir(d2.path("many"))) == sorted(files)
        for i, (name, data) in enumerate(files.items()):
            assert d2.path("many", name).read_bytes() == data, name
            if i % 3 == 0:
                st = d2.path("many", name).stat()
                assert (st.st_mode & 0o7777, st.st_mtime_ns) == attrs(i), name
        out = castore("ls", "--json", "/many", home=d2.home)
        assert len(json.loads(out.stdout)) == len(files)
    finally:
        d2.stop()


def test_corrupted_chunk_reads_as_eio(tmp_path: Path) -> None:
    data = os.urandom(200_000)                 # one chunk, stored as is (incompressible)
    with drive(tmp_path) as d:
        d.path("bad").write_bytes(data)
        d.path("good").write_bytes(os.urandom(50_000))
        good = _sha(d.path("good"))
    store = tmp_path / "home" / "store" / "data.mdb"
    raw = bytearray(store.read_bytes())
    at = raw.find(data[5000:5100])
    assert at >= 0
    raw[at + 10] ^= 0xFF
    store.write_bytes(raw)
    with drive(tmp_path) as d:
        code, took = _timed_errno(d.path("bad").read_bytes)
        assert code == errno.EIO and took < PROMPT
        fd = os.open(d.path("bad"), os.O_RDONLY)
        try:
            assert oserror(os.pread, fd, 100, 0) == errno.EIO
        finally:
            os.close(fd)
        assert _sha(d.path("good")) == good            # the rest of the drive still reads
        assert len(os.getxattr(d.path("bad"), "user.castore.id")) == 64


def test_a_small_store_is_read_in_when_the_drive_mounts(tmp_path: Path) -> None:
    """A daemon mounting a store small against memory asks for all of it at once, in the
    background: the first walk of the drive does not wait on the disk page by page."""
    with drive(tmp_path) as d:
        for i in range(50):
            d.path(f"f{i}").write_bytes(os.urandom(20_000))
    store = tmp_path / "home" / "store" / "data.mdb"
    drop_pages(store)
    assert resident_fraction(store, 0, store.stat().st_size) < 0.5
    with drive(tmp_path) as d:
        deadline = time.monotonic() + 10.0
        while resident_fraction(store, 0, store.stat().st_size) < 0.99:
            assert time.monotonic() < deadline, "the store was not read in"
            time.sleep(0.1)
        assert len(d.path("f7").read_bytes()) == 20_000


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signals_unmount_cleanly(tmp_path: Path, sig: int) -> None:
    d = Drive(tmp_path).start()
    try:
        d.path("f").write_bytes(b"kept")
        d.send(sig)
        assert d.wait(15) == 0, d.log_text()
        assert mounts.find(str(d.mnt)) is None
        assert "Ignoring invalid" not in d.log_text()     # libfuse's options are all valid
    finally:
        d.stop()
    with drive(tmp_path) as d:
        assert d.path("f").read_bytes() == b"kept"


def test_sigterm_with_a_busy_mount(tmp_path: Path) -> None:
    d = Drive(tmp_path).start()
    try:
        d.path("f").write_bytes(b"x" * 10_000)
        fd = os.open(d.path("f"), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)   # cached pages read without us
        busy = subprocess.Popen(["sleep", "60"], cwd=d.mnt)   # a shell sitting in the drive
        try:
            started = time.monotonic()
            d.send(signal.SIGTERM)
            assert d.wait(20) == 0, d.log_text()
            assert time.monotonic() - started < 15
            assert mounts.find(str(d.mnt)) is None
            assert oserror(os.pread, fd, 10, 0) in (errno.ENOTCONN, errno.EIO,
                                                    errno.ECONNABORTED)
        finally:
            busy.kill()
            busy.wait()
            oserror(os.close, fd)
    finally:
        d.stop()


def test_castore_mount_and_umount(tmp_path: Path) -> None:
    d = Drive(tmp_path, command=("mount",)).start()
    try:
        d.path("hello").write_bytes(b"via castore mount")
        out = castore("umount", d.mnt, "--json", home=d.home)
        assert json.loads(out.stdout)["mountpoint"] == str(d.mnt)
        assert d.wait(15) == 0, d.log_text()
        assert mounts.find(str(d.mnt)) is None
        refused = castore("umount", d.mnt, home=d.home, check=False)
        assert refused.returncode != 0 and "no drive is mounted" in refused.stderr
    finally:
        d.stop()
    d = Drive(tmp_path, command=("mount",)).start()
    try:
        assert d.path("hello").read_bytes() == b"via castore mount"
        d.kill()
        assert mounts.state(str(d.mnt)) == "stale"
        castore("umount", d.mnt, home=d.home)       # a stale drive is cleaned up too
        assert mounts.find(str(d.mnt)) is None
    finally:
        d.stop()


def test_umount_leaves_other_directories_alone(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    out = castore("umount", plain, home=tmp_path / "home", check=False)
    assert out.returncode == 2 and "no drive is mounted" in out.stderr


def _write_big(path: Path, total: int, rss: list[int], d: Drive) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(total >> 20):
            f.write(block[i % 7:] + block[:i % 7])         # distinct chunks, same cost
            if i % 32 == 0:
                rss.append(d.rss())
    rss.append(d.rss())


@pytest.mark.timeout(300)
def test_writing_512_mib_keeps_memory_bounded(tmp_path: Path) -> None:
    with drive(tmp_path) as d:
        d.path("warm").write_bytes(os.urandom(8 << 20))    # pools and caches exist now
        base = d.rss()
        rss: list[int] = []
        _write_big(d.path("big"), 512 << 20, rss, d)
        assert d.path("big").stat().st_size == 512 << 20
        growth = max(rss) - base
        assert growth < 200 << 20, f"daemon RSS grew by {growth >> 20} MiB (samples " \
                                   f"{[r >> 20 for r in rss]})"


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_writing_4_gib_keeps_memory_bounded(tmp_path: Path) -> None:
    with drive(tmp_path) as d:
        d.path("warm").write_bytes(os.urandom(8 << 20))
        base = d.rss()
        rss: list[int] = []
        _write_big(d.path("huge"), 4 << 30, rss, d)
        assert d.path("huge").stat().st_size == 4 << 30
        assert max(rss) - base < 256 << 20, [r >> 20 for r in rss]
        with open(d.path("huge"), "rb") as f:
            f.seek((4 << 30) - (1 << 20))
            assert len(f.read()) == 1 << 20


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    with drive(tmp_path) as d:
        errors: list[BaseException] = []
        payloads = {f"w{i}": os.urandom((i + 1) * 3 << 20) for i in range(4)}

        def work(name: str) -> None:
            try:
                for _ in range(3):
                    d.path(name).write_bytes(payloads[name])
                    assert d.path(name).read_bytes() == payloads[name]
            except BaseException as exc:  # reported below
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(n,)) for n in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
