"""Each file-system operation of the drive on a real FUSE mount, with the errno it fails with.

One daemon serves the module; every test works in its own directory of the drive.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import stat
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from castore.fuse import PUSH_LIMIT, CastoreOps
from castore.vfs import DeadlineError
from castore.vfs.core import RENAMED_QUIET
from castore.vfs.types import Opened
from pagecache import resident_fraction
from fuse_helpers import (RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT, Drive, castore,
                          errname, needs_fuse, oserror, renameat2)

pytestmark = [pytest.mark.fuse, needs_fuse, pytest.mark.timeout(120)]


def test_create_write_read_stat(here: Path) -> None:
    p = here / "hello.txt"
    p.write_bytes(b"hello, drive\n")
    st = p.stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_size == 13 and st.st_nlink == 1
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * 10**9
    assert p.read_bytes() == b"hello, drive\n"
    (here / "sub1").mkdir()
    (here / "sub2").mkdir(mode=0o750)
    dst = here.stat()
    assert stat.S_ISDIR(dst.st_mode) and dst.st_nlink == 2 + 2
    assert stat.S_IMODE((here / "sub2").stat().st_mode) == 0o750
    assert sorted(os.listdir(here)) == ["hello.txt", "sub1", "sub2"]
    kinds = {e.name: (e.is_file(), e.is_dir()) for e in os.scandir(here)}
    assert kinds == {"hello.txt": (True, False), "sub1": (False, True), "sub2": (False, True)}


def test_errnos(here: Path) -> None:
    (here / "f").write_bytes(b"x")
    (here / "d").mkdir()
    (here / "d" / "inner").write_bytes(b"y")
    cases = [
        (os.stat, (here / "missing",), errno.ENOENT),
        (os.open, (here / "missing", os.O_RDONLY), errno.ENOENT),
        (os.stat, (here / "f" / "below",), errno.ENOTDIR),
        (os.mkdir, (here / "f" / "below",), errno.ENOTDIR),
        (os.rmdir, (here / "f",), errno.ENOTDIR),
        (os.open, (here / "d", os.O_WRONLY), errno.EISDIR),
        (os.unlink, (here / "d",), errno.EISDIR),
        (os.stat, (here / ("n" * 256),), errno.ENAMETOOLONG),
        (os.mkdir, (here / ("n" * 300),), errno.ENAMETOOLONG),
        (os.rmdir, (here / "d",), errno.ENOTEMPTY),
        (os.mkdir, (here / "d",), errno.EEXIST),
        (os.open, (here / "f", os.O_WRONLY | os.O_CREAT | os.O_EXCL), errno.EEXIST),
        (os.link, (here / "f", here / "hard"), errno.EPERM),
        (os.mkfifo, (here / "fifo",), errno.EPERM),
        (os.readlink, (here / "f",), errno.EINVAL),
    ]
    for fn, args, want in cases:
        got = oserror(fn, *args)
        assert got == want, f"{fn.__name__}{args}: {errname(got)}, expected {errname(want)}"
    name255 = here / ("n" * 255)
    name255.write_bytes(b"ok")
    assert name255.read_bytes() == b"ok"


def test_unlink_mkdir_rmdir(here: Path) -> None:
    (here / "a").write_bytes(b"1")
    os.unlink(here / "a")
    assert not (here / "a").exists()
    (here / "x" / "y").mkdir(parents=True)
    os.rmdir(here / "x" / "y")
    os.rmdir(here / "x")
    assert os.listdir(here) == []


def test_rename_files_and_dirs(here: Path) -> None:
    (here / "a").write_bytes(b"A")
    (here / "b").write_bytes(b"B")
    os.rename(here / "a", here / "b")                       # over an existing file
    assert (here / "b").read_bytes() == b"A" and not (here / "a").exists()
    (here / "d1").mkdir()
    (here / "d1" / "f").write_bytes(b"in d1")
    (here / "d2").mkdir()
    os.rename(here / "d1", here / "d2")                     # over an empty directory
    assert (here / "d2" / "f").read_bytes() == b"in d1"
    (here / "d3").mkdir()
    (here / "d4").mkdir()
    (here / "d4" / "keep").write_bytes(b"k")
    assert oserror(os.rename, here / "d3", here / "d4") == errno.ENOTEMPTY
    assert oserror(os.rename, here / "b", here / "d3") == errno.EISDIR
    assert oserror(os.rename, here / "d3", here / "b") == errno.ENOTDIR
    assert oserror(os.rename, here / "d2", here / "d2" / "inside") == errno.EINVAL
    (here / "d2" / "deep").mkdir()
    os.rename(here / "d2", here / "moved")                  # a tree moves as one
    assert (here / "moved" / "f").read_bytes() == b"in d1"
    assert (here / "moved" / "deep").is_dir()
    assert sorted(os.listdir(here)) == ["b", "d3", "d4", "moved"]


def test_renameat2_flags(here: Path) -> None:
    (here / "one").write_bytes(b"1")
    (here / "two").write_bytes(b"2")
    # RENAME_EXCHANGE must not turn into a plain rename that destroys the target
    assert renameat2(here / "one", here / "two", RENAME_EXCHANGE) == errno.EINVAL
    assert (here / "one").read_bytes() == b"1" and (here / "two").read_bytes() == b"2"
    assert renameat2(here / "one", here / "two", RENAME_WHITEOUT) == errno.EINVAL
    assert renameat2(here / "one", here / "two", RENAME_NOREPLACE) == errno.EEXIST
    assert (here / "two").read_bytes() == b"2"
    assert renameat2(here / "one", here / "three", RENAME_NOREPLACE) == 0
    assert (here / "three").read_bytes() == b"1" and not (here / "one").exists()


def test_symlinks(here: Path) -> None:
    (here / "target").write_bytes(b"pointed at")
    os.symlink("target", here / "link")
    os.symlink("../nowhere/at/all", here / "dangling")
    assert os.readlink(here / "link") == "target"
    assert stat.S_ISLNK(os.lstat(here / "link").st_mode)
    assert os.lstat(here / "link").st_size == len("target")
    assert (here / "link").read_bytes() == b"pointed at"
    assert os.readlink(here / "dangling") == "../nowhere/at/all"
    assert oserror(os.stat, here / "dangling") == errno.ENOENT
    assert oserror(os.symlink, "x", here / "link") == errno.EEXIST
    long = "/".join(["d" * 200] * 20)            # 4,019 bytes, as long as the kernel takes
    os.symlink(long, here / "long")
    assert os.readlink(here / "long") == long
    os.unlink(here / "link")
    assert (here / "target").exists()


def test_chmod_and_utimens(here: Path) -> None:
    p = here / "f"
    p.write_bytes(b"data")
    os.chmod(p, 0o600)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    os.chmod(here, 0o700)
    assert stat.S_IMODE(here.stat().st_mode) == 0o700
    os.utime(p, ns=(1_600_000_000_000_000_001, 1_600_000_000_123_456_789))
    assert p.stat().st_mtime_ns == 1_600_000_000_123_456_789
    before = time.time_ns()
    os.utime(p)                                             # "touch": now
    assert p.stat().st_mtime_ns >= before - 10**9
    assert p.read_bytes() == b"data"


@pytest.mark.skipif(os.geteuid() != 0, reason="root's view of permissions")
def test_permissions_as_root_on_a_local_file_system(here: Path) -> None:
    """The drive leaves root's permission checks to itself (no default_permissions on a
    root-only mount): root reads and writes whatever the mode, and runs only files with an
    x bit, as on a local file system."""
    p = here / "script"
    p.write_bytes(b"#!/bin/sh\nexit 0\n")
    os.chmod(p, 0o444)
    with open(p, "ab") as f:                                # root writes a read-only file
        f.write(b"# more\n")
    os.chmod(p, 0o000)
    assert p.read_bytes().endswith(b"# more\n")
    assert os.access(p, os.R_OK | os.W_OK) and not os.access(p, os.X_OK)
    assert oserror(subprocess.run, [str(p)]) == errno.EACCES
    os.chmod(p, 0o100)
    assert os.access(p, os.X_OK)
    assert subprocess.run([str(p)]).returncode == 0
    assert os.access(here, os.X_OK | os.W_OK)


def test_truncate_and_ftruncate(here: Path) -> None:
    p = here / "t"
    p.write_bytes(b"0123456789")
    os.truncate(p, 4)
    assert p.read_bytes() == b"0123"
    os.truncate(p, 8)
    assert p.read_bytes() == b"0123\0\0\0\0"
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 2)
        assert os.fstat(fd).st_size == 2
        os.pwrite(fd, b"XY", 6)
        assert os.pread(fd, 100, 0) == b"01\0\0\0\0XY"
    finally:
        os.close(fd)
    assert p.read_bytes() == b"01\0\0\0\0XY"


def test_o_append_and_o_trunc(here: Path) -> None:
    p = here / "log"
    p.write_bytes(b"first\n")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"second\n")
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"third\n")                            # O_APPEND ignores the offset
    finally:
        os.close(fd)
    assert p.read_bytes() == b"first\nsecond\nthird\n"
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        os.write(fd, b"new")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"new"


def test_unlink_while_open(here: Path) -> None:
    p = here / "doomed"
    p.write_bytes(b"still here")
    fd = os.open(p, os.O_RDWR)
    try:
        os.unlink(p)
        assert os.listdir(here) == []                       # no .fuse_hidden names show
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
        os.ftruncate(fd, 5)
        assert os.fstat(fd).st_size == 5
        assert os.fstat(fd).st_size == 5 and os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"STILL"
    finally:
        os.close(fd)
    assert os.listdir(here) == []
    os.rmdir(here)                                          # nothing hidden keeps it busy


def test_unlinked_dir_entry_does_not_block_rmdir(here: Path) -> None:
    d = here / "d"
    d.mkdir()
    (d / "f").write_bytes(b"x")
    fd = os.open(d / "f", os.O_RDONLY)
    try:
        os.unlink(d / "f")
        os.rmdir(d)
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)


def test_rename_over_open_file_keeps_old_bytes(here: Path) -> None:
    (here / "cfg").write_bytes(b"old version")
    fd = os.open(here / "cfg", os.O_RDONLY)
    try:
        (here / "cfg.tmp").write_bytes(b"new version")
        os.rename(here / "cfg.tmp", here / "cfg")           # the editor's save
        assert sorted(os.listdir(here)) == ["cfg"]
        assert os.pread(fd, 100, 0) == b"old version"
        assert (here / "cfg").read_bytes() == b"new version"
    finally:
        os.close(fd)


def test_descriptors_share_one_open_state(here: Path) -> None:
    p = here / "shared"
    p.write_bytes(b"aaaaaaaaaa")
    w = os.open(p, os.O_WRONLY)
    r = os.open(p, os.O_RDONLY)
    try:
        os.pwrite(w, b"BB", 3)
        assert os.pread(r, 100, 0) == b"aaaBBaaaaa"        # before any close
        os.pwrite(w, b"tail", 10)
        assert os.pread(r, 100, 0) == b"aaaBBaaaaatail"
        w2 = os.open(p, os.O_RDWR)
        try:
            assert os.pread(w2, 100, 0) == b"aaaBBaaaaatail"
        finally:
            os.close(w2)
    finally:
        os.close(w)
        os.close(r)
    assert p.read_bytes() == b"aaaBBaaaaatail"


def test_close_commits_a_version(mounted: Drive, here: Path) -> None:
    p = here / "v"
    with open(p, "wb") as f:
        f.write(b"version one")
    rel = "/" + str(p.relative_to(mounted.mnt))
    out = json.loads(castore("stat", "--json", rel, home=mounted.home).stdout)
    assert out["size"] == 11
    assert os.getxattr(p, "user.castore.id").decode() == out["content"]
    assert castore("cat", rel, home=mounted.home).stdout == "version one"


def test_close_to_open(mounted: Drive, here: Path, tmp_path: Path) -> None:
    """A descriptor open on a version keeps reading it when another version is committed
    (here through the daemon's API); the next open sees the new one."""
    p = here / "doc.txt"
    p.write_bytes(b"the old text")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert os.read(fd, 4) == b"the "
        local = tmp_path / "doc.txt"
        local.write_bytes(b"the NEW text, longer")
        rel_dir = "/" + str(here.relative_to(mounted.mnt))
        castore("add", "-q", local, "--to", rel_dir, home=mounted.home)
        assert os.pread(fd, 100, 0) == b"the old text"
    finally:
        os.close(fd)
    assert p.read_bytes() == b"the NEW text, longer"


def test_a_reader_served_from_the_page_cache_keeps_its_version(mounted: Drive, here: Path,
                                                                tmp_path: Path) -> None:
    """A file the kernel holds is opened with no open state in the daemon: when its pages go
    (fadvise here) the reads still get the version it opened, not the one committed since;
    unlinked while open, it leaves no name behind in the namespace."""
    p = here / "doc.txt"
    old = b"version one\n" * 1000
    p.write_bytes(old)
    assert p.read_bytes() == old                            # the kernel keeps its pages now
    time.sleep(0.3)     # the RELEASEs of those closes reach the daemon after close returns
    rel_dir = "/" + str(here.relative_to(mounted.mnt))
    fd = os.open(p, os.O_RDONLY)
    try:
        (tmp_path / "doc.txt").write_bytes(b"version two\n" * 2000)   # longer: the kernel
        # holds one size per file, and would cut reads of the old version to a shorter one
        castore("add", "-q", tmp_path / "doc.txt", "--to", rel_dir, home=mounted.home)
        os.unlink(p)
        assert os.fstat(fd).st_nlink == 0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(old) + 10, 0) == old
        names = json.loads(castore("ls", "--json", rel_dir, home=mounted.home).stdout)
        assert names == [] and os.listdir(here) == []
    finally:
        os.close(fd)


def test_readers_see_whole_versions_while_a_writer_replaces_the_file(here: Path) -> None:
    """The editor's save (write a new file, rename it over the old one) while other threads
    open and read the file again and again: each read gets one whole version, and the
    versions replaced while open leave no hidden name behind."""
    versions = [bytes([65 + i]) * (20_000 + 997 * i) for i in range(6)] + \
        [os.urandom(PUSH_LIMIT + 100_000), b""]
    known = set(versions)
    p = here / "f"
    p.write_bytes(versions[0])
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                data = p.read_bytes()
            except OSError as exc:
                bad.append(repr(exc))
                return
            if data not in known:
                bad.append(f"{len(data)} bytes of no version")
                return

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(80):
            tmp = here / f"f.tmp{i}"
            tmp.write_bytes(versions[i % len(versions)])
            os.rename(tmp, p)
    finally:
        stop.set()
        for t in readers:
            t.join(60)
    assert not bad, bad[:5]
    assert os.listdir(here) == ["f"]
    assert p.read_bytes() == versions[79 % len(versions)]


def test_client_api_changes_show_on_the_mount_at_once(mounted: Drive, here: Path,
                                                       tmp_path: Path) -> None:
    """The kernel keeps attributes and names for 10 s; a change made through the daemon's API
    drops what it holds of the paths changed (sizes, names that appeared or went away)."""
    p, new = here / "doc.txt", here / "new.txt"
    p.write_bytes(b"the old text")
    assert p.stat().st_size == 12 and not new.exists()      # cached, the missing name too
    for name, text in (("doc.txt", b"the NEW text, longer"), ("new.txt", b"fresh")):
        (tmp_path / name).write_bytes(text)
    rel_dir = "/" + str(here.relative_to(mounted.mnt))
    castore("add", "-q", tmp_path / "doc.txt", tmp_path / "new.txt", "--to", rel_dir,
            home=mounted.home)
    deadline = time.monotonic() + 3.0           # the drop is asynchronous, but prompt
    while (p.stat().st_size != 20 or not new.exists()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert p.stat().st_size == 20 and new.read_bytes() == b"fresh"
    castore("rm", rel_dir + "/new.txt", home=mounted.home)
    deadline = time.monotonic() + 3.0
    while new.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not new.exists()


def test_written_pages_stay_cached_after_the_attributes_refresh(here: Path) -> None:
    """The kernel drops a file's pages when castore says its content changed (a new version
    at open, or a change from another peer), not when it sees a new mtime: a file written
    here and read back after its attributes expired is served from the pages the writes
    left, without a trip through the drive."""
    p = here / "written"
    block = os.urandom(128 << 10)
    with open(p, "w+b") as f:                   # open for reading too: through the cache
        for _ in range(64):                                  # 8 MiB in page-aligned writes
            f.write(block)
    time.sleep(0.2)
    with open(p, "rb") as f:                    # the first read fetches fresh attributes
        assert f.read(4096) == block[:4096]
        assert resident_fraction(p, 0, 8 << 20) == 1.0
        f.seek(0)
        assert f.read() == block * 64


def test_a_small_file_is_in_the_page_cache_once_opened(mounted: Drive, here: Path,
                                                        tmp_path: Path) -> None:
    """The open of a small file the kernel holds nothing of hands it the whole file: its
    reader finds every page there and sends no READ (and so no GETATTR after one). A
    larger file is read on demand."""
    small, large = os.urandom(10_000), os.urandom(PUSH_LIMIT + 4096)
    (tmp_path / "small").write_bytes(small)
    (tmp_path / "large").write_bytes(large)
    castore("add", "-q", tmp_path / "small", tmp_path / "large", "--to",
            "/" + str(here.relative_to(mounted.mnt)), home=mounted.home)
    deadline = time.monotonic() + 3.0
    while not (here / "large").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(RENAMED_QUIET)     # none is handed over just after a rename (earlier tests)
    assert resident_fraction(here / "small", 0, len(small)) == 1.0     # opened, not read
    assert resident_fraction(here / "large", 0, len(large)) == 0.0
    assert (here / "small").read_bytes() == small
    assert (here / "large").read_bytes() == large


def test_handing_a_file_over_never_fails_its_open() -> None:
    """One layer, over a stand-in vfs: the hand-over at open is a shortcut. An error while
    reading the file leaves it to the READs (the open succeeds: a failed OPEN gets no
    RELEASE, and its handle would leak); one after the pages went in makes the kernel drop
    them (keep_cache 0)."""
    class Vfs:
        def __init__(self, fail_in: str) -> None:
            self.fail_in = fail_in

        def open(self, path: str, flags: int) -> Opened:
            return Opened(7, True, push=True)

        def whole(self, fh: int, limit: int) -> bytearray:
            if self.fail_in == "whole":
                raise DeadlineError("the file stayed busy")
            return bytearray(b"content")

        def alone(self, fh: int) -> bool:
            raise DeadlineError("the open-file table stayed busy")

    class Notify:
        def store(self, path: bytes, offset: int, data: bytearray) -> bool:
            return True

    for fail_in, keep in (("whole", 1), ("alone", 0)):
        ops = CastoreOps(Vfs(fail_in), "/mnt")  # type: ignore[arg-type]
        ops.notify = Notify()                   # type: ignore[assignment]
        fi = SimpleNamespace(flags=os.O_RDONLY, keep_cache=None, noflush=0, direct_io=0, fh=0)
        assert ops.open("/f", fi) == 0
        assert (fi.fh, fi.keep_cache) == (7, keep), fail_in


def test_views_of_libfuse_buffers_cover_exactly_their_bytes() -> None:
    """One layer: read and write callbacks see libfuse's buffer through a view of exactly
    the size asked, whatever the size (small files each have their own), that writes
    through to the buffer."""
    import ctypes
    from castore.fuse import _buffer
    for size in (1, 4095, 4096, 131_072, 1 << 20, (1 << 24) + 1):
        raw = ctypes.create_string_buffer(size + 8)
        view = _buffer(ctypes.cast(raw, ctypes.POINTER(ctypes.c_char)), size)
        assert len(view) == size and not view.readonly
        data = os.urandom(size)
        view[:] = data
        assert raw.raw[:size] == data and raw.raw[size:] == bytes(8)


def test_a_write_only_handle_writes_around_the_page_cache(here: Path) -> None:
    """Bytes written through a handle open for writing only are not copied into the
    kernel's page cache (that copy cost more than the write); they read back the same."""
    p = here / "around"
    data = os.urandom(4 << 20)
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        assert resident_fraction(p, 0, len(data)) == 0.0
    assert p.read_bytes() == data
    assert p.read_bytes() == data and resident_fraction(p, 0, len(data)) == 1.0
    with open(p, "r+b") as f:                   # open for reading too: through the cache
        f.write(data[:1 << 20])
        f.flush()
        assert resident_fraction(p, 0, 1 << 20) == 1.0
    fd = os.open(p, os.O_WRONLY)                # over cached pages: they are dropped
    try:
        os.pwrite(fd, b"new", 5000)
    finally:
        os.close(fd)
    assert p.read_bytes() == data[:5000] + b"new" + data[5003:]


def test_xattrs(mounted: Drive, here: Path) -> None:
    p = here / "x"
    p.write_bytes(b"content" * 1000)
    cid = os.getxattr(p, "user.castore.id").decode()
    assert len(cid) == 64 and int(os.getxattr(p, "user.castore.chunks")) == 1
    rel = "/" + str(p.relative_to(mounted.mnt))
    assert json.loads(castore("stat", "--json", rel, home=mounted.home).stdout)["content"] == cid
    os.setxattr(p, "user.color", b"blue")
    assert os.getxattr(p, "user.color") == b"blue"
    assert set(os.listxattr(p)) == {"user.castore.id", "user.castore.chunks", "user.color"}
    assert oserror(os.setxattr, p, "user.color", b"red", os.XATTR_CREATE) == errno.EEXIST
    assert oserror(os.setxattr, p, "user.size", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(p, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.color") == b"red"
    assert oserror(os.setxattr, p, "user.castore.id", b"x") == errno.EPERM
    assert oserror(os.setxattr, p, "trusted.x", b"x") in (errno.ENOTSUP, errno.EPERM)
    assert oserror(os.getxattr, p, "user.nothing") == errno.ENODATA
    assert oserror(os.getxattr, p, "security.capability") == errno.ENODATA
    os.removexattr(p, "user.color")
    assert oserror(os.getxattr, p, "user.color") == errno.ENODATA
    assert oserror(os.removexattr, p, "user.color") == errno.ENODATA
    os.setxattr(here, "user.dir", b"on a directory")
    assert os.getxattr(here, "user.dir") == b"on a directory"
    p.write_bytes(b"other content")                          # a new version, a new id
    assert os.getxattr(p, "user.castore.id").decode() != cid


def test_statfs_reports_the_repo_disk(mounted: Drive) -> None:
    got, want = os.statvfs(mounted.mnt), os.statvfs(mounted.home)
    assert got.f_bsize == want.f_bsize and got.f_blocks == want.f_blocks
    assert abs(got.f_bavail - want.f_bavail) < want.f_blocks // 100 + 1024
    assert got.f_namemax == 255


def test_fsync_and_sizes(here: Path) -> None:
    p = here / "synced"
    with open(p, "wb") as f:
        f.write(b"z" * 100_000)
        f.flush()
        os.fsync(f.fileno())
        f.write(b"y" * 100)
    st = p.stat()
    assert st.st_size == 100_100 and st.st_blocks == (100_100 + 511) // 512


def test_large_file_sequential_and_random_reads(here: Path) -> None:
    data = os.urandom(24 << 20) + bytes(8 << 20) + os.urandom(3_000_001)
    p = here / "big.bin"
    with open(p, "wb") as f:
        for i in range(0, len(data), 1 << 20):
            f.write(data[i:i + (1 << 20)])
    assert p.stat().st_size == len(data)
    assert hashlib.sha256(p.read_bytes()).digest() == hashlib.sha256(data).digest()
    with open(p, "rb") as f:
        for off in (len(data) - 10, 7, 5 << 20, 30 << 20, 12_345_678):
            f.seek(off)
            assert f.read(100_000) == data[off:off + 100_000]
    chunks = int(os.getxattr(p, "user.castore.chunks"))
    assert 8 <= chunks <= 80


def test_edit_in_the_middle_of_a_large_file(here: Path) -> None:
    data = bytearray(os.urandom(20 << 20))
    p = here / "edit.bin"
    p.write_bytes(data)
    before = int(os.getxattr(p, "user.castore.chunks"))
    with open(p, "r+b") as f:
        f.seek(10 << 20)
        f.write(b"EDITED")
        f.seek(len(data))
        f.write(b"appended")
    data[10 << 20:(10 << 20) + 6] = b"EDITED"
    data += b"appended"
    assert p.read_bytes() == data
    assert abs(int(os.getxattr(p, "user.castore.chunks")) - before) <= 3


def test_shared_mmap_writes(here: Path) -> None:
    p = here / "mapped"
    p.write_bytes(bytes(3 * 4096))
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 3 * 4096)
        m[4096:4101] = b"HELLO"
        m.flush()
        m.close()
    assert p.read_bytes()[4096:4101] == b"HELLO"


def test_many_files_in_one_directory(here: Path) -> None:
    for i in range(300):
        (here / f"f{i:04d}").write_bytes(str(i).encode())
    names = sorted(os.listdir(here))
    assert names == [f"f{i:04d}" for i in range(300)]
    assert (here / "f0123").read_bytes() == b"123"


def test_large_directories_listed_side_by_side(here: Path) -> None:
    """Two directories, each read in many READDIRs (long names), listed through two open
    descriptors in turns: each continues its own listing."""
    want = {}
    for d in ("a", "b"):
        (here / d).mkdir()
        want[d] = sorted(f"{d}-{i:04d}-" + "n" * 100 for i in range(600))
        for name in want[d]:
            (here / d / name).write_bytes(b"")
    iters = {d: os.scandir(here / d) for d in want}
    got: dict[str, list[str]] = {d: [] for d in want}
    try:
        while iters:
            for d, it in list(iters.items()):
                entry = next(it, None)
                if entry is None:
                    it.close()
                    del iters[d]
                else:
                    got[d].append(entry.name)
    finally:
        for it in iters.values():
            it.close()
    assert {d: sorted(names) for d, names in got.items()} == want


def test_listings_being_read_are_bounded() -> None:
    """One layer, over a stand-in vfs: listings kept for the READDIRs that continue them are
    dropped oldest first beyond DIR_LISTINGS; a continuation that finds its listing gone,
    or held for another directory at that handle, lists the directory again."""
    from castore import fuse as fuse_mod
    from castore.vfs import Attr
    from castore.ops import Kind
    calls: list[str] = []

    class Vfs:
        def readdir_attrs(self, path: str) -> list[tuple[bytes, Attr]]:
            calls.append(path)
            return [(path.encode(), Attr(Kind.FILE, 0o644, 0, 0))]

    ops = CastoreOps(Vfs(), "/mnt")  # type: ignore[arg-type]
    for handle in range(fuse_mod.DIR_LISTINGS + 10):
        ops.listing(f"/d{handle}", handle, True)
    assert len(calls) == fuse_mod.DIR_LISTINGS + 10
    assert len(ops._dirs) == fuse_mod.DIR_LISTINGS
    last = fuse_mod.DIR_LISTINGS + 9
    assert ops.listing(f"/d{last}", last, False)[2][0] == f"/d{last}".encode()
    assert len(calls) == fuse_mod.DIR_LISTINGS + 10        # continued from what was kept
    assert ops.listing("/d0", 0, False)[2][0] == b"/d0"     # dropped: listed again
    assert ops.listing("/other", last, False)[2][0] == b"/other"
    assert len(calls) == fuse_mod.DIR_LISTINGS + 12


def test_pending_file_is_visible_before_close(here: Path) -> None:
    p = here / "growing"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        os.write(fd, b"part")
        assert os.listdir(here) == ["growing"]
        assert p.stat().st_size == 4 and stat.S_IMODE(p.stat().st_mode) == 0o640
        assert oserror(os.rmdir, here) == errno.ENOTEMPTY
        os.rename(p, here / "renamed")
        os.write(fd, b"-more")
    finally:
        os.close(fd)
    assert (here / "renamed").read_bytes() == b"part-more"
    assert os.listdir(here) == ["renamed"]
