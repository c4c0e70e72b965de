"""The castore command line end to end: real `castore` processes on a real LMDB repo, both
against a running daemon process and offline (the repo opened directly, no daemon).

Every command's --json output is parsed somewhere here (run_json fails on anything but one
JSON document; add --json is parsed line by line); cat writes raw bytes by design.
"""
from __future__ import annotations

import json
import os
import random
import signal
import stat as st
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from daemon_helpers import (EXIT_NOT_FOUND, EXIT_PROBLEMS, EXIT_USAGE, HEX64, Daemon,
                            added_lines, assert_same_tree, assert_user_error, make_file,
                            make_tree, run, run_json, running_daemon)

from castore.ids import ChunkId

pytestmark = pytest.mark.timeout(120)


class Home:
    """A repo home for one test, in one of the two modes."""

    def __init__(self, path: Path, mode: str, daemon: Daemon | None) -> None:
        self.path = path
        self.mode = mode
        self.daemon = daemon

    def __call__(self, *args: str | os.PathLike[str], **kw: Any) -> CompletedProcess[Any]:
        return run(*args, home=self.path, **kw)

    def json(self, *args: str | os.PathLike[str], **kw: Any) -> Any:
        return run_json(*args, home=self.path, **kw)


@pytest.fixture(params=["offline", "daemon"])
def home(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Home]:
    path = tmp_path / "home"
    if request.param == "offline":
        run("init", home=path)
        yield Home(path, "offline", None)
        return
    with running_daemon(path) as daemon:          # a daemon initializes a new home itself
        yield Home(path, "daemon", daemon)
        assert daemon.alive(), f"the daemon died during the test:\n{daemon.log_text()}"


# -- init ---------------------------------------------------------------------------------
def test_init_creates_then_reuses(tmp_path: Path) -> None:
    h = tmp_path / "h"
    first = run_json("init", home=h)
    assert first["created"] is True and first["home"] == str(h)
    assert len(first["replica"]) == 32
    assert (h / "store" / "data.mdb").exists()
    assert st.S_IMODE(h.stat().st_mode) == 0o700
    again = run("init", home=h)
    assert again.stdout.startswith("reusing castore repo at")
    assert run_json("init", home=h) == {**first, "created": False}


def test_commands_need_an_initialized_repo(tmp_path: Path) -> None:
    proc = run("ls", "/", home=tmp_path / "nothing", check=False)
    assert_user_error(proc, EXIT_USAGE, "castore init")


# -- add and cat --------------------------------------------------------------------------
def test_add_and_cat(home: Home, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", seed=11, n_files=12)
    proc = home("add", "-r", tree.root)
    added = added_lines(proc.stdout)
    assert len(proc.stdout.splitlines()) == len(tree.files), proc.stdout
    assert sorted(added) == sorted(f"/src/{rel}" for rel in tree.files)
    for rel, data in tree.files.items():
        cid = added[f"/src/{rel}"]
        assert HEX64.match(cid)
        if 0 < len(data) <= 256 << 10:           # a one-chunk file is named by its chunk
            assert cid == ChunkId.of(data).hex
    rng = random.Random(1)
    for rel in rng.sample(sorted(tree.files), 2):      # by path
        assert home("cat", f"/src/{rel}", binary=True).stdout == tree.files[rel]
    for rel in rng.sample(sorted(tree.files), 2):      # by content id
        assert home("cat", added[f"/src/{rel}"], binary=True).stdout == tree.files[rel]

    # Single files --to a directory (made on the way), with --json lines.
    a = make_file(tmp_path / "a.bin", 5000, seed=1)
    b = make_file(tmp_path / "b.bin", 70000, seed=2)
    lines = home("add", "--json", tmp_path / "a.bin", tmp_path / "b.bin", "--to", "/x/y"
                 ).stdout.splitlines()
    assert [json.loads(line) for line in lines] == [
        {"path": "/x/y/a.bin", "content": ChunkId.of(a).hex, "size": 5000, "new_chunks": 1,
         "kind": "file", "error": ""},
        {"path": "/x/y/b.bin", "content": ChunkId.of(b).hex, "size": 70000, "new_chunks": 1,
         "kind": "file", "error": ""}]

    # A changed file gets a new id; the old version stays readable by its id.
    (tmp_path / "a.bin").write_bytes(a[:-1] + bytes([a[-1] ^ 1]))
    again = added_lines(home("add", tmp_path / "a.bin", "--to", "/x/y").stdout)
    assert again == {"/x/y/a.bin": ChunkId.of((tmp_path / "a.bin").read_bytes()).hex}
    assert home("cat", "/x/y/a.bin", binary=True).stdout == (tmp_path / "a.bin").read_bytes()
    assert home("cat", ChunkId.of(a).hex, binary=True).stdout == a

    # Bad items are reported one line each (exit 1: problems found); the rest is added.
    (tmp_path / "adir").mkdir()
    good = make_file(tmp_path / "good", 100, seed=3)
    proc = home("add", tmp_path / "missing", tmp_path / "adir", tmp_path / "good",
                check=False)
    assert proc.returncode == EXIT_PROBLEMS and "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and all(e.startswith("castore: error: ") for e in errors), errors
    assert "missing" in errors[0] and "use -r" in errors[1]
    assert added_lines(proc.stdout) == {"/good": ChunkId.of(good).hex}


def test_cat_large_file_and_ranges(home: Home, tmp_path: Path) -> None:
    data = make_file(tmp_path / "big", 20 << 20, seed=20)
    cid = added_lines(home("add", tmp_path / "big").stdout)["/big"]
    info = home.json("stat", "/big")
    assert info["size"] == len(data) and info["content"] == cid
    assert info["chunks"] >= 5, info              # content-defined chunks of about 1 MiB
    assert home("cat", "/big", binary=True).stdout == data
    assert home("cat", cid, binary=True).stdout == data
    n = len(data)
    for off, length in [(1_000_003, 3_000_001), (n - 10, 100), (n, 5), (n // 2, None)]:
        args = ["--offset", str(off)] + ([] if length is None else ["--length", str(length)])
        want = data[off:] if length is None else data[off:off + length]
        assert home("cat", "/big", *args, binary=True).stdout == want, (off, length)
    assert home("cat", cid, "--offset", "777", "--length", "0", binary=True).stdout == b""


# -- get ----------------------------------------------------------------------------------
def test_get_file_and_tree_keep_bytes_modes_times_links(home: Home, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "src", seed=5, n_files=15, big=[6 << 20], n_symlinks=3)
    added = added_lines(home("add", "-r", tree.root).stdout)
    out = tmp_path / "out"
    saved = home.json("get", "/src", out)
    assert saved["items"] == len(tree.files) + len(tree.symlinks) + len(tree.dirs) + 1
    assert_same_tree(tree.root, out)
    # One file: to a path, and into an existing directory under its own name.
    rel = max(tree.files, key=lambda r: len(tree.files[r]))
    src = tree.root / rel
    home("get", f"/src/{rel}", tmp_path / "one")
    (tmp_path / "into").mkdir()
    home("get", f"/src/{rel}", tmp_path / "into")
    for got in (tmp_path / "one", tmp_path / "into" / src.name):
        assert got.read_bytes() == tree.files[rel]
        assert st.S_IMODE(got.stat().st_mode) == st.S_IMODE(src.stat().st_mode)
        assert got.stat().st_mtime_ns == src.stat().st_mtime_ns
    assert os.listdir(tmp_path / "into") == [src.name]       # no temporary file left
    # By content id: the bytes. A symlink comes out as a symlink.
    home("get", added[f"/src/{rel}"], tmp_path / "byid")
    assert (tmp_path / "byid").read_bytes() == tree.files[rel]
    link = sorted(tree.symlinks)[-1]
    home("get", f"/src/{link}", tmp_path / "link")
    assert os.readlink(tmp_path / "link") == tree.symlinks[link]


# -- namespace edits ----------------------------------------------------------------------
def test_status_ls_stat_mkdir_mv_rm_verify(home: Home, tmp_path: Path) -> None:
    status = home.json("status")
    text = home("status").stdout
    assert status["home"] == str(home.path) and int(status["stats"]["files"]) == 0
    if home.daemon is not None:
        assert status["daemon"] == "running" and status["pid"] == home.daemon.pid
        assert status["uptime"] >= 0
        assert text.startswith(f"daemon:      running (pid {home.daemon.pid}")
    else:
        assert status["daemon"] == "stopped" and "pid" not in status
        assert text.startswith("daemon:      stopped")

    one = make_file(tmp_path / "one", 3000, seed=7)
    two = make_file(tmp_path / "two", 4000, seed=8)
    os.chmod(tmp_path / "one", 0o640)
    made = home.json("mkdir", "/a")
    assert (made["path"], made["kind"], made["mode"]) == ("/a", "dir", 0o755)
    home("add", tmp_path / "one", tmp_path / "two", "--to", "/a")
    listing = home.json("ls", "/a")
    assert [(e["name"], e["kind"], e["size"], e["content"]) for e in listing] == \
        [("one", "file", 3000, ChunkId.of(one).hex), ("two", "file", 4000, ChunkId.of(two).hex)]
    assert listing[0]["mode"] == 0o640
    assert listing[0]["mtime_ns"] == (tmp_path / "one").stat().st_mtime_ns
    text = home("ls", "/a").stdout.splitlines()
    assert len(text) == 2 and text[0].startswith("-rw-r-----") and text[0].endswith(" one")

    # mkdir -p makes parents and accepts an existing directory.
    assert home.json("mkdir", "-p", "/p/q/r")["path"] == "/p/q/r"
    assert home.json("mkdir", "-p", "/p/q")["path"] == "/p/q"

    # mv: rename, move to another directory, then over an existing file (which it replaces).
    moved = home.json("mv", "/a/one", "/a/uno")
    assert moved["path"] == "/a/uno" and moved["content"] == ChunkId.of(one).hex
    home("mv", "/a/uno", "/p/q/one")
    home("mv", "/p/q/one", "/a/two")
    assert [e["name"] for e in home.json("ls", "/a")] == ["two"]
    assert home("cat", "/a/two", binary=True).stdout == one
    report = home.json("verify")
    assert report["ok"] is True and report["corrupt"] == [] and report["missing"] == []
    assert report["chunks"] >= 2
    proc = home("verify")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(": ok")

    # rm: a file, an empty dir, a tree with -r.
    assert home.json("rm", "/a/two") == {"path": "/a/two", "removed": 1}
    assert home("rm", "/a").stdout == ""
    assert home.json("rm", "-r", "/p") == {"path": "/p", "removed": 3}
    assert home.json("ls", "/") == []


# -- user errors --------------------------------------------------------------------------
ERRORS = [      # (argv, exit code, text in the message, also offline)
    (("cat", "/missing"), EXIT_NOT_FOUND, "/missing", True),
    (("stat", "/missing/deeper"), EXIT_NOT_FOUND, "/missing", False),
    (("get", "/missing", "OUT"), EXIT_NOT_FOUND, "/missing", True),
    (("rm", "/missing"), EXIT_NOT_FOUND, "/missing", False),
    (("mv", "/missing", "/x"), EXIT_NOT_FOUND, "/missing", True),
    (("cat", "0" * 64), EXIT_NOT_FOUND, "0" * 64, True),
    (("cat", "f" * 63), EXIT_NOT_FOUND, "f" * 63, False),
    (("rm", "/full"), EXIT_USAGE, "not empty", True),
    (("mkdir", "/full"), EXIT_USAGE, "exists", True),
    (("mkdir", "/full/file"), EXIT_USAGE, "exists", False),
    (("cat", "/full"), EXIT_USAGE, "directory", False),
    (("cat", "--offset", "-1", "/full/file"), EXIT_USAGE, "negative", True),
    (("mv", "/full", "/full/file/x"), EXIT_USAGE, "", False),
    (("mkdir", "/m/n"), EXIT_NOT_FOUND, "no such file", False),
    (("mkdir", "-p", "/full/file/sub"), EXIT_USAGE, "not a directory", False),
]


def test_user_errors_are_one_line_with_the_documented_code(home: Home, tmp_path: Path) -> None:
    make_file(tmp_path / "file", 10, seed=1)
    home("add", tmp_path / "file", "--to", "/full")
    for argv, code, contains, offline_too in ERRORS:
        if home.mode == "offline" and not offline_too:
            continue     # offline, exit codes come straight from the error classes
        argv = tuple(str(tmp_path / "out") if a == "OUT" else a for a in argv)
        proc = home(*argv, check=False)
        assert proc.stdout == "", (argv, proc.stdout)
        assert_user_error(proc, code, contains)
    assert not (tmp_path / "out").exists()
    assert home("cat", "/full/file", binary=True).stdout == (tmp_path / "file").read_bytes()


def test_private_socket_and_one_daemon_per_home(tmp_path: Path) -> None:
    h = tmp_path / "h"
    with running_daemon(h) as first:
        info = first.socket.lstat()
        assert st.S_ISSOCK(info.st_mode) and st.S_IMODE(info.st_mode) == 0o600
        assert st.S_IMODE(h.stat().st_mode) == 0o700
        state = json.loads((h / "daemon.json").read_text())
        assert state["pid"] == first.pid and state["socket"] == str(first.socket)
        proc = run("daemon", home=h, check=False, timeout=30)
        assert_user_error(proc, EXIT_USAGE, f"pid {first.pid}) is already running")
        assert first.alive()
        assert run_json("status", home=h)["pid"] == first.pid


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_stops_cleanly_on_signal(tmp_path: Path, sig: int) -> None:
    h = tmp_path / "h"
    data = make_file(tmp_path / "f", 300_000, seed=int(sig))
    d = Daemon(h)
    try:
        d.start()
        run("add", tmp_path / "f", home=h)
        assert d.stop(sig) == 0, d.log_text()
    finally:
        d.stop()
    assert "Traceback" not in d.log_text(), d.log_text()
    assert not (h / "castore.sock").exists()
    assert not (h / "daemon.json").exists()
    assert run_json("status", home=h)["daemon"] == "stopped"
    assert run("cat", "/f", home=h, binary=True).stdout == data


def test_restart_after_sigkill_with_a_stale_socket(tmp_path: Path) -> None:
    h = tmp_path / "h"
    data = make_file(tmp_path / "f", 50_000, seed=3)
    d = Daemon(h)
    try:
        d.start()
        run("add", tmp_path / "f", home=h)
        assert d.kill9() == -signal.SIGKILL
        assert (h / "castore.sock").exists() and (h / "daemon.json").exists()   # stale
        assert run_json("status", home=h)["daemon"] == "stopped"
        assert run("cat", "/f", home=h, binary=True).stdout == data           # offline
        d2 = Daemon(h)
        try:
            d2.start()
            assert run_json("status", home=h)["pid"] == d2.pid != d.pid
            assert run("cat", "/f", home=h, binary=True).stdout == data
            assert json.loads((h / "daemon.json").read_text())["pid"] == d2.pid
        finally:
            assert d2.stop() == 0
    finally:
        d.stop()
