"""What the Repo API hands in and out: entries of stat and ls, add results, ingest items and
verify reports. Plain values with no storage behind them, so a client of the daemon can use
them without loading the store."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from castore.ops import Kind


@dataclass(frozen=True)
class Entry:
    """What stat and ls report about one node."""

    path: str
    name: str
    kind: str                        # "file" | "dir" | "symlink"
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    content: str = ""                # content id (hex) of the current version
    chunks: int = 0
    versions: int = 0                # concurrent heads; more than 1 means a conflict
    target: str = ""                 # symlink target
    node: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class AddResult:
    path: str
    content: str = ""
    size: int = 0
    new_chunks: int = 0
    kind: str = "file"
    error: str = ""


@dataclass(slots=True)
class IngestItem:
    """One thing to add: a local file (source), in-memory bytes (data), chunks, dir or symlink.
    Slotted: an add of a large tree holds one per file, and the cyclic collector rescans them."""

    dest: str
    kind: Kind = Kind.FILE
    mode: int = 0o644
    mtime_ns: int = 0
    source: str | None = None
    size: int = 0
    data: bytes | None = None
    chunks: Iterable[bytes | memoryview] | None = None
    target: bytes = b""


@dataclass
class VerifyReport:
    chunks: int = 0
    bytes: int = 0
    manifests: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing
