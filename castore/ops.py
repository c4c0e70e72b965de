"""Namespace records: the Op (one entry of the operation log) and the Node (materialized
state of one file, directory or symlink), with their compact binary encodings, and the one
validator for names that come from clients, peers and the mount.

Encodings are little-endian structs with length-prefixed byte strings; they are stored in the
op log and must stay readable, so changes need a new format tag.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from castore.errors import InvalidNameError, NameTooLongError
from castore.ids import NodeId

MAX_NAME = 255
NO_VALUE = 0xFFFFFFFF            # attribute value length meaning "removed"
_OP_HEAD = struct.Struct("<24sQB16s")          # key, seq, type, node
_MOVE = struct.Struct("<16sBH")                # parent, kind, name length
_CONTENT = struct.Struct("<BQH")               # manifest length, size, parent count
_ATTR = struct.Struct("<HI")                   # key length, value length (NO_VALUE: removed)
_NODE_ATTR = struct.Struct("<H24sI")           # key length, op key, value length
_NODE_HEAD = struct.Struct("<BB16sH24sHH")     # kind, placed, parent, name len, move key, attrs, heads
_VERSION = struct.Struct("<24sBQ")             # op key, manifest length, size
_U16 = struct.Struct("<H")
_ZERO24 = b"\x00" * 24
_ZERO16 = b"\x00" * 16


class Kind(IntEnum):
    UNKNOWN = 0
    FILE = 1
    DIR = 2
    SYMLINK = 3


_KINDS = {k.value: k for k in Kind}


def kind_of(value: int) -> Kind:
    """Kind(value), without the enum machinery's cost for the known ones (namespace scans
    decode one per entry); ValueError for an unknown one."""
    k = _KINDS.get(value)
    return k if k is not None else Kind(value)


class OpType(IntEnum):
    MOVE = 1        # may also carry a first version (create-with-content)
    CONTENT = 2
    ATTR = 3


def op_key(ts: int, origin: bytes) -> bytes:
    """24 bytes that sort in op order: big-endian HLC timestamp, then the origin replica."""
    return ts.to_bytes(8, "big") + origin


def key_ts(key: bytes) -> int:
    return int.from_bytes(key[:8], "big")


def check_name(name: bytes) -> bytes:
    """Refuse '/', NUL, '.', '..', empty names and names over 255 bytes. Names are kept as
    the bytes given: no Unicode normalization."""
    if not name or name in (b".", b".."):
        raise InvalidNameError(f"invalid name {name!r}")
    if b"/" in name or b"\x00" in name:
        raise InvalidNameError(f"a name may not contain '/' or NUL: {name!r}")
    if len(name) > MAX_NAME:
        raise NameTooLongError(f"name is {len(name)} bytes, the limit is {MAX_NAME}")
    return name


def split_path(path: str | bytes) -> list[bytes]:
    raw = os.fsencode(path)
    return [check_name(p) for p in raw.split(b"/") if p and p != b"."]


def int_attr(v: int) -> bytes:
    return v.to_bytes(8, "little", signed=True)


Attrs = dict[bytes, "bytes | None"]     # None removes the attribute


def file_attrs(mode: int, mtime_ns: int) -> Attrs:
    """The attributes a new file or directory starts with."""
    return {b"mode": int_attr(mode & 0o7777), b"mtime": int_attr(mtime_ns)}


def encode_attrs(attrs: Attrs) -> bytes:
    parts = [_U16.pack(len(attrs))]
    for k, v in attrs.items():
        if v is None:
            parts.append(_ATTR.pack(len(k), NO_VALUE))
            parts.append(k)
        else:
            parts.append(_ATTR.pack(len(k), len(v)))
            parts.append(k)
            parts.append(v)
    return b"".join(parts)


def decode_attrs(buf: bytes, pos: int) -> tuple[Attrs, int]:
    (n,) = _U16.unpack_from(buf, pos)
    pos += 2
    out: Attrs = {}
    for _ in range(n):
        klen, vlen = _ATTR.unpack_from(buf, pos)
        pos += 6
        k = buf[pos:pos + klen]
        pos += klen
        if vlen == NO_VALUE:
            out[k] = None
        else:
            out[k] = buf[pos:pos + vlen]
            pos += vlen
    return out, pos


@dataclass(slots=True)
class Op:
    """One namespace operation. `key` orders ops; `seq` numbers the origin's ops from 1.

    MOVE places `node` at (parent, name); with a manifest it also records a first version.
    CONTENT records a version replacing `parents`. Any op may set attributes (LWW per key).
    Treat as immutable once made (not frozen only because frozen dataclasses are slow to build).
    """

    key: bytes
    seq: int
    type: OpType
    node: NodeId
    parent: NodeId | None = None
    name: bytes = b""
    kind: Kind = Kind.UNKNOWN
    manifest: bytes = b""
    size: int = 0
    parents: tuple[bytes, ...] = ()
    attrs: Attrs = field(default_factory=dict)

    @property
    def origin(self) -> bytes:
        return self.key[8:]

    @property
    def has_content(self) -> bool:
        return self.type == OpType.CONTENT or (self.type == OpType.MOVE and bool(self.manifest))

    def encode(self) -> bytes:
        parts = [_OP_HEAD.pack(self.key, self.seq, self.type, self.node.raw)]
        if self.type == OpType.MOVE:
            assert self.parent is not None
            parts.append(_MOVE.pack(self.parent.raw, self.kind, len(self.name)))
            parts.append(self.name)
        if self.type != OpType.ATTR:
            parts.append(_CONTENT.pack(len(self.manifest), self.size, len(self.parents)))
            parts.append(self.manifest)
            parts.extend(self.parents)
        parts.append(encode_attrs(self.attrs))
        return b"".join(parts)

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> Op:
        buf = bytes(buf)
        key, seq, typ, node = _OP_HEAD.unpack_from(buf, 0)
        pos = _OP_HEAD.size
        typ = OpType(typ)
        parent, name, kind, manifest, size, parents = None, b"", Kind.UNKNOWN, b"", 0, ()
        if typ == OpType.MOVE:
            p, k, nlen = _MOVE.unpack_from(buf, pos)
            pos += _MOVE.size
            parent, kind, name = NodeId(p), Kind(k), buf[pos:pos + nlen]
            pos += nlen
        if typ != OpType.ATTR:
            mlen, size, pcount = _CONTENT.unpack_from(buf, pos)
            pos += _CONTENT.size
            manifest = buf[pos:pos + mlen]
            pos += mlen
            parents = tuple(buf[pos + 24 * i:pos + 24 * i + 24] for i in range(pcount))
            pos += 24 * pcount
        attrs, pos = decode_attrs(buf, pos)
        return cls(key, seq, typ, NodeId(node), parent, name, kind, manifest, size, parents,
                   attrs)


@dataclass(frozen=True, slots=True)
class Version:
    key: bytes          # the op that made it
    manifest: bytes
    size: int


@dataclass(slots=True)
class Node:
    """The materialized state of one node."""

    id: NodeId
    kind: Kind = Kind.UNKNOWN
    parent: NodeId | None = None           # None: not (yet) in the tree
    name: bytes = b""
    move_key: bytes = b""                  # the move op that placed it
    attrs: dict[bytes, tuple[bytes, bytes | None]] = field(default_factory=dict)  # k->(key, v)
    heads: list[Version] = field(default_factory=list)

    @property
    def head(self) -> Version | None:
        """The newest head: the version shown at the node's name."""
        return self.heads[-1] if self.heads else None

    def attr(self, name: bytes) -> bytes | None:
        entry = self.attrs.get(name)
        return None if entry is None else entry[1]

    def attr_int(self, name: bytes, default: int = 0) -> int:
        v = self.attr(name)
        return default if v is None else int.from_bytes(v, "little", signed=True)

    def encode(self) -> bytes:
        parts = [_NODE_HEAD.pack(self.kind, 1 if self.parent else 0,
                                 self.parent.raw if self.parent else _ZERO16, len(self.name),
                                 self.move_key or _ZERO24, len(self.attrs), len(self.heads)),
                 self.name]
        for k, (ts, v) in sorted(self.attrs.items()):   # same bytes whatever the op order
            if v is None:
                parts.append(_NODE_ATTR.pack(len(k), ts, NO_VALUE))
                parts.append(k)
            else:
                parts.append(_NODE_ATTR.pack(len(k), ts, len(v)))
                parts.append(k)
                parts.append(v)
        for h in self.heads:
            parts.append(_VERSION.pack(h.key, len(h.manifest), h.size))
            parts.append(h.manifest)
        return b"".join(parts)

    @classmethod
    def decode(cls, nid: NodeId, buf: bytes | memoryview) -> Node:
        buf = bytes(buf)
        kind, placed, parent, nlen, move_key, nattrs, nheads = _NODE_HEAD.unpack_from(buf, 0)
        pos = _NODE_HEAD.size
        name = buf[pos:pos + nlen]
        pos += nlen
        attrs: dict[bytes, tuple[bytes, bytes | None]] = {}
        for _ in range(nattrs):
            klen, ts, vlen = _NODE_ATTR.unpack_from(buf, pos)
            pos += _NODE_ATTR.size
            k = buf[pos:pos + klen]
            pos += klen
            if vlen == NO_VALUE:
                attrs[k] = (ts, None)
            else:
                attrs[k] = (ts, buf[pos:pos + vlen])
                pos += vlen
        heads = []
        for _ in range(nheads):
            key, mlen, size = _VERSION.unpack_from(buf, pos)
            pos += _VERSION.size
            heads.append(Version(key, buf[pos:pos + mlen], size))
            pos += mlen
        return cls(nid, kind_of(kind), NodeId(parent) if placed else None, name,
                   move_key if move_key != _ZERO24 else b"", attrs, heads)
