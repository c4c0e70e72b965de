"""The close journal (castore.journal): closes journaled but never committed are committed
when the repo next opens, exactly once; a torn tail is ignored; records already applied are
skipped."""
from __future__ import annotations

import os

from castore import journal
from castore.config import Config
from castore.files import Manifest, prepare
from castore.ids import ROOT, NodeId
from castore.journal import Intent, Journal
from castore.ops import int_attr
from castore.repo import Repo


def _intent(name: bytes, data: bytes) -> Intent:
    p = prepare(data, 1)
    return Intent(Manifest((p.cid,), (p.raw_len,)), [p], None, ROOT, name, None, 0o640,
                  1_700_000_000_000_000_000, {b"x:user.k": b"v"})


def _journal_closes(config: Config, files: dict[bytes, bytes]) -> Journal:
    jnl = Journal(config.journal_path)
    for name, data in files.items():
        jnl.append(_intent(name, data))
    return jnl


def test_an_intent_survives_its_encoding() -> None:
    it = _intent(b"name", os.urandom(5000))
    back = Intent.decode(it.encode())
    assert (back.manifest, back.node, back.parent, back.name, back.base_key, back.mode,
            back.mtime_ns, back.attrs) == (it.manifest, None, ROOT, b"name", None, 0o640,
                                           it.mtime_ns, it.attrs)
    assert [(p.cid, bytes(p.stored)) for p in back.prepared] == \
        [(p.cid, bytes(p.stored)) for p in it.prepared]


def test_closes_left_in_the_journal_are_committed_at_open(repo_config: Config) -> None:
    Repo.init(repo_config).close()
    files = {f"f{i}".encode(): os.urandom(100 + i) for i in range(20)}
    _journal_closes(repo_config, files).close()
    with Repo.open(repo_config) as repo:
        for name, data in files.items():
            path = "/" + name.decode()
            assert b"".join(repo.read(path)) == data
            e = repo.stat(path)
            assert (e.mode, e.versions, e.xattrs) == (0o640, 1, {"user.k": b"v"})
        ops = sum(repo.version_vector().values())
    with Repo.open(repo_config) as repo:               # nothing is applied twice
        assert sum(repo.version_vector().values()) == ops
        assert Journal(repo_config.journal_path).empty


def test_a_torn_tail_is_ignored_and_the_rest_kept(repo_config: Config) -> None:
    Repo.init(repo_config).close()
    jnl = _journal_closes(repo_config, {b"whole": b"kept"})
    end = jnl.append(_intent(b"torn", b"never returned"))
    jnl.close()
    os.truncate(repo_config.journal_path, end - 5)      # the process died mid-write
    with Repo.open(repo_config) as repo:
        assert b"".join(repo.read("/whole")) == b"kept"
        assert [e.name for e in repo.listdir("/")] == ["whole"]


def test_records_already_committed_are_skipped(repo_config: Config) -> None:
    repo = Repo.init(repo_config)
    jnl = repo.close_journal()
    first = jnl.append(_intent(b"a", b"first"))
    jnl.append(_intent(b"b", b"second"))
    # the first close was committed (with its journal position) before the process died
    repo.env.write(lambda t: (journal.apply(t, repo.ns, repo.files, repo.store,
                                            _intent(b"a", b"first")),
                              journal.mark_applied(t, jnl.generation, first)))
    ops = sum(repo.version_vector().values())
    repo.close()
    with Repo.open(repo_config) as repo:
        assert sum(repo.version_vector().values()) == ops + 1     # only b's create
        assert sorted(e.name for e in repo.listdir("/")) == ["a", "b"]
        assert repo.stat("/a").versions == 1


def test_a_close_whose_directory_went_away_is_dropped_not_fatal(repo_config: Config
                                                                 ) -> None:
    repo = Repo.init(repo_config)
    repo.mkdir("/d")
    parent = repo.env.read(lambda t: repo.ns.resolve(t, "/d"))
    jnl = repo.close_journal()
    it = _intent(b"f", b"data")
    it.parent = parent.id
    jnl.append(it)
    jnl.append(_intent(b"g", b"other"))
    repo.remove("/d", recursive=True)
    repo.close()
    with Repo.open(repo_config) as repo:
        assert [e.name for e in repo.listdir("/")] == ["g"]


def test_attribute_changes_left_in_the_journal_are_committed_at_open(repo_config: Config
                                                                      ) -> None:
    repo = Repo.init(repo_config)
    repo.mkdir("/d")
    node = repo.env.read(lambda t: repo.ns.resolve(t, "/d"))
    jnl = repo.close_journal()
    change = Intent.of_attrs(node.id, {b"mode": int_attr(0o700), b"mtime": int_attr(12345),
                                       b"x:user.k": b"v"})
    back = Intent.decode(change.encode())
    assert (back.attrs_only, back.node, back.attrs) == (True, node.id, change.attrs)
    jnl.append(change)
    jnl.append(Intent.of_attrs(NodeId.random(), {b"mode": int_attr(0o600)}))   # gone: dropped
    repo.close()
    with Repo.open(repo_config) as repo:
        e = repo.stat("/d")
        assert (e.mode, e.mtime_ns, e.xattrs) == (0o700, 12345, {"user.k": b"v"})
        assert Journal(repo_config.journal_path).empty


def test_attribute_changes_by_name_follow_the_create_they_name(repo_config: Config) -> None:
    """A change of a file whose create is still in the journal names it by its directory
    and name: applied after the create, it finds the new file (and drops quietly when
    nothing has that name)."""
    Repo.init(repo_config).close()
    jnl = _journal_closes(repo_config, {b"new": b"content"})
    change = Intent.of_attrs_at(ROOT, b"new", {b"mode": int_attr(0o600),
                                               b"mtime": int_attr(777)})
    back = Intent.decode(change.encode())
    assert (back.attrs_only, back.node, back.parent, back.name, back.attrs) == \
        (True, None, ROOT, b"new", change.attrs)
    jnl.append(change)
    jnl.append(Intent.of_attrs_at(ROOT, b"nothing", {b"mode": int_attr(0o600)}))
    jnl.close()
    with Repo.open(repo_config) as repo:
        e = repo.stat("/new")
        assert (e.mode, e.mtime_ns) == (0o600, 777)
        assert b"".join(repo.read("/new")) == b"content"
        assert Journal(repo_config.journal_path).empty
