"""castore.mounts without mounting anything: reading the mount table, and the rule that only
castore's own drives are ever unmounted."""
from __future__ import annotations

from pathlib import Path

import pytest

from castore import mounts
from castore.mounts import MountEntry, MountError


def test_mountinfo_escapes_are_decoded() -> None:
    assert mounts._unescape(r"/tmp/with\040space\011tab") == "/tmp/with space\ttab"
    assert mounts._unescape("/plain") == "/plain"


def test_the_mount_table_is_readable() -> None:
    for entry in mounts.fuse_mounts():
        assert entry.fstype == "fuse" or entry.fstype.startswith("fuse.")


@pytest.fixture
def foreign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pretend another program's FUSE file system is mounted at tmp_path/mnt."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setattr(mounts, "fuse_mounts",
                        lambda: [MountEntry(str(mnt), "fuse.sshfs", "user@host:")])

    def no_fusermount(*args: object) -> None:
        raise AssertionError("fusermount3 must not be run on another program's mount")
    monkeypatch.setattr(mounts, "_fusermount", no_fusermount)
    return mnt


def test_other_programs_mounts_are_never_unmounted(foreign: Path) -> None:
    assert mounts.find(str(foreign)) is not None
    with pytest.raises(MountError, match="not a castore drive"):
        mounts.unmount(str(foreign))
    with pytest.raises(MountError, match="already has a fuse.sshfs mount"):
        mounts.clear_stale(str(foreign))


def test_nothing_mounted(tmp_path: Path) -> None:
    assert mounts.state(str(tmp_path)) == "absent"
    assert mounts.unmount(str(tmp_path)) == "not mounted"
    assert mounts.clear_stale(str(tmp_path)) is False
