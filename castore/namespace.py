"""The namespace as an operation log with a materialized tree (DESIGN.md section 5).

Ops: Move (create, rename, delete = move to TRASH), SetContent (a new version on close),
SetAttr (mode, times, xattrs, symlink target; last writer wins per attribute). Any op may carry
attributes. Every op has an OpKey: a hybrid-logical-clock timestamp and the origin replica, a
total order. Moves are settled as in Kleppmann et al.'s replicated tree: an op older than ones
already applied undoes them, applies, and redoes them; a move that would form a cycle is
skipped. Content keeps every concurrent head (a version is a head unless a later version lists
it as a parent). So every replica that applies the same set of ops, in any order, ends with the
same tree.

Storage goes through the KvTxn seam (LMDB or memory): tables ops, opseq, nodes, dirents,
superseded and meta. No lmdb, grpc or FUSE imports here.
"""
from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from castore.errors import (ExistsError, InvalidNameError, IsDirectoryError, NotDirectoryError,
                            NotEmptyError, PathNotFoundError)
from castore.hlc import HybridClock, physical_ms
from castore.ids import ROOT, TRASH, NodeId
from castore.ops import (Attrs, Kind, Node, Op, OpType, Version, check_name, key_ts, kind_of,
                         op_key, split_path)
from castore.store import KvTxn

__all__ = ["Attrs", "Kind", "Namespace", "Node", "Op", "OpType", "Version", "ViewEntry",
           "check_name", "conflict_name", "split_path"]

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
MAX_SKEW_MS = 5 * 60 * 1000      # ops stamped further ahead than this are held, not applied
CONFLICT_TAG = b".sync-conflict-"


def conflict_name(name: bytes, key: bytes) -> bytes:
    """Syncthing's name for a conflicting version: name.sync-conflict-YYYYMMDD-HHMMSS-<peer>.ext,
    from the op key's time (UTC) and origin. Kept within the 255-byte name limit."""
    when = time.strftime("%Y%m%d-%H%M%S", time.gmtime(physical_ms(key_ts(key)) / 1000))
    tag = CONFLICT_TAG + when.encode() + b"-" + key[8:].hex()[:7].encode()
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    room = 255 - len(tag) - len(ext)
    return stem[:max(room, 1)] + tag + ext[:max(0, 255 - len(tag) - 1)]


@dataclass(frozen=True, slots=True)
class ViewEntry:
    """One name as users see it. version is None for the node's newest head, or the key of
    an older concurrent head shown as a conflict copy."""

    name: bytes
    node: NodeId
    kind: Kind
    version: bytes | None = None

_NO_UNDO = b""
Hook = Callable[[KvTxn, bytes], None]


def _undo_state(node: Node) -> bytes:
    """Where a node was before a move: enough to undo the move exactly."""
    if node.parent is None:
        return b"\x00"
    return b"\x01" + node.parent.raw + (node.move_key or b"\x00" * 24) + node.name


def _dirent_key(parent: NodeId, name: bytes, nid: NodeId) -> bytes:
    return parent.raw + name + b"\x00" + nid.raw


class Namespace:
    """The tree engine over a KvTxn. Every method runs inside the caller's transaction.

    on_retain/on_release are called with a content ref when a version becomes, or stops being,
    a head, so the caller can keep reference counts in the same transaction. Not thread-safe by
    itself: the store serializes write transactions.
    """

    def __init__(self, replica: bytes, clock: HybridClock | None = None,
                 on_retain: Hook | None = None, on_release: Hook | None = None) -> None:
        if len(replica) != 16:
            raise ValueError("a replica id is 16 bytes")
        self.replica = replica
        self.clock = clock or HybridClock()
        self.listeners: list[Callable[[list[Op], bool], None]] = []
        self._retain = on_retain or (lambda t, m: None)
        self._release = on_release or (lambda t, m: None)

    # -- reading --------------------------------------------------------------------------
    def get(self, txn: KvTxn, nid: NodeId) -> Node | None:
        cache = self._cache(txn)
        node = cache.get(nid)
        if node is not None:
            return node
        buf = txn.get("nodes", nid.raw)
        if buf is None:
            return Node(nid, Kind.DIR) if nid in (ROOT, TRASH) else None
        node = cache[nid] = Node.decode(nid, buf)
        return node

    def _cache(self, txn: KvTxn) -> dict[NodeId, Node]:
        """Nodes decoded in this transaction; dirty ones are written once, before commit."""
        cache = txn.cache.get("ns.nodes")
        if cache is None:
            cache = txn.cache["ns.nodes"] = {}  # type: ignore[assignment]
            txn.cache["ns.dirty"] = set()
            txn.cache["ns.vv"] = {}
            txn.cache["ns.new"] = []
            txn.before_commit.append(lambda: self._flush(txn))
            txn.after_commit.append(lambda: self._publish(txn))
        return cache  # type: ignore[return-value]

    def _flush(self, txn: KvTxn) -> None:
        cache: dict[NodeId, Node] = txn.cache["ns.nodes"]  # type: ignore[assignment]
        for nid in txn.cache["ns.dirty"]:  # type: ignore[attr-defined]
            txn.put("nodes", nid.raw, cache[nid].encode())
        for origin, seq in txn.cache["ns.vv"].items():  # type: ignore[attr-defined]
            txn.put("meta", b"vv:" + origin, _U64.pack(seq))

    def _publish(self, txn: KvTxn) -> None:
        """After a commit: tell listeners which ops it applied, local and remote apart."""
        new: list[tuple[Op, bool]] = txn.cache.get("ns.new") or []  # type: ignore[assignment]
        if not new or not self.listeners:
            return
        local = [op for op, is_local in new if is_local]
        remote = [op for op, is_local in new if not is_local]
        for listener in list(self.listeners):
            if local:
                listener(local, True)
            if remote:
                listener(remote, False)

    def _seq(self, txn: KvTxn, origin: bytes) -> int:
        self._cache(txn)
        vv: dict[bytes, int] = txn.cache["ns.vv"]  # type: ignore[assignment]
        seq = vv.get(origin)
        if seq is None:
            raw = txn.get("meta", b"vv:" + origin)
            seq = _U64.unpack(raw)[0] if raw is not None else 0
        return seq

    def in_tree(self, txn: KvTxn, node: Node) -> bool:
        """True if the node hangs from the root (not trashed, not orphaned)."""
        x: Node | None = node
        for _ in range(4096):
            if x is None or x.id == TRASH:
                return False
            if x.id == ROOT:
                return True
            if x.parent is None:
                return False
            x = self.get(txn, x.parent)
        return False

    def lookup(self, txn: KvTxn, parent: NodeId, name: bytes) -> NodeId | None:
        best: tuple[bytes, NodeId] | None = None
        prefix = parent.raw + name + b"\x00"
        for key, value in txn.scan("dirents", prefix):
            if len(key) != len(prefix) + 16:
                continue
            cand = (bytes(value[1:25]), NodeId(key[-16:]))
            if best is None or cand > best:
                best = cand
        return None if best is None else best[1]

    def children(self, txn: KvTxn, parent: NodeId) -> Iterator[tuple[bytes, NodeId, Kind]]:
        """(name, node, kind) of each entry, sorted by name; one winner per name."""
        pending: tuple[bytes, bytes, NodeId, Kind] | None = None
        for key, value in txn.scan("dirents", parent.raw):
            name, nid = key[16:-17], NodeId(key[-16:])
            cand = (name, bytes(value[1:25]), nid, kind_of(value[0]))
            if pending is not None and pending[0] != name:
                yield pending[0], pending[2], pending[3]
                pending = None
            if pending is None or cand[1] > pending[1]:
                pending = cand
        if pending is not None:
            yield pending[0], pending[2], pending[3]

    def listing(self, txn: KvTxn, parent: NodeId) -> list[ViewEntry]:
        """The directory as users see it, sorted by name: per name the node placed last keeps
        the name and other nodes placed there concurrently get conflict names; a file with
        several heads shows the newest at its name and each older head as a conflict copy."""
        groups: dict[bytes, list[tuple[bytes, NodeId, Kind]]] = {}
        for key, value in txn.scan("dirents", parent.raw):
            groups.setdefault(key[16:-17], []).append(
                (bytes(value[1:25]), NodeId(key[-16:]), kind_of(value[0])))
        out: list[ViewEntry] = []
        for name, cands in groups.items():
            cands.sort(reverse=True)
            for i, (move_key, nid, kind) in enumerate(cands):
                shown = name if i == 0 else conflict_name(name, move_key)
                out.append(ViewEntry(shown, nid, kind))
                if kind == Kind.FILE:
                    node = self.get(txn, nid)
                    if node is not None and len(node.heads) > 1:
                        out.extend(ViewEntry(conflict_name(shown, h.key), nid, kind, h.key)
                                   for h in node.heads[:-1])
        out.sort(key=lambda e: e.name)
        return out

    def lookup_view(self, txn: KvTxn, parent: NodeId, name: bytes) -> ViewEntry | None:
        """The entry named `name` in the users' view of parent (conflict names included)."""
        nid = self.lookup(txn, parent, name)
        if nid is not None:
            node = self.get(txn, nid)
            return ViewEntry(name, nid, node.kind if node else Kind.UNKNOWN)
        if CONFLICT_TAG not in name:
            return None
        return next((e for e in self.listing(txn, parent) if e.name == name), None)

    def resolve_view(self, txn: KvTxn, path: str | bytes) -> tuple[Node, bytes | None]:
        """Like resolve, through the users' view: returns the node and, for a conflict copy,
        the version it shows."""
        node = self.get(txn, ROOT)
        assert node is not None
        version: bytes | None = None
        for part in split_path(path):
            if node.kind != Kind.DIR or version is not None:
                raise NotDirectoryError(f"{os.fsdecode(node.name)} is not a directory")
            entry = self.lookup_view(txn, node.id, part)
            child = self.get(txn, entry.node) if entry else None
            if entry is None or child is None:
                raise PathNotFoundError(f"no such file or directory: {os.fsdecode(path)}")
            node, version = child, entry.version
        return node, version

    def has_children(self, txn: KvTxn, parent: NodeId) -> bool:
        return next(iter(txn.scan("dirents", parent.raw)), None) is not None

    def resolve(self, txn: KvTxn, path: str | bytes) -> Node:
        """The node at path. Raises PathNotFoundError or NotDirectoryError."""
        node = self.get(txn, ROOT)
        assert node is not None
        for part in split_path(path):
            if node.kind != Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(node.name)} is not a directory")
            nid = self.lookup(txn, node.id, part)
            child = self.get(txn, nid) if nid else None
            if child is None:
                raise PathNotFoundError(f"no such file or directory: {os.fsdecode(path)}")
            node = child
        return node

    def resolve_parent(self, txn: KvTxn, path: str | bytes) -> tuple[Node, bytes]:
        parts = split_path(path)
        if not parts:
            raise InvalidNameError("the root has no parent")
        parent = self.resolve(txn, b"/".join(parts[:-1]))
        if parent.kind != Kind.DIR:
            raise NotDirectoryError(f"{os.fsdecode(b'/'.join(parts[:-1]))} is not a directory")
        return parent, parts[-1]

    def vv(self, txn: KvTxn) -> dict[bytes, int]:
        """Version vector: highest contiguous sequence number applied, per origin."""
        out = {bytes(k[3:]): _U64.unpack(v)[0] for k, v in txn.scan("meta", b"vv:")}
        out.update(txn.cache.get("ns.vv") or {})  # type: ignore[call-overload]
        return out

    def last_key(self, txn: KvTxn) -> bytes | None:
        for k, _ in txn.scan("ops", reverse=True):
            return k
        return None

    # -- local operations -----------------------------------------------------------------
    def _op(self, txn: KvTxn, type_: OpType, node: NodeId, fresh: bool = False,
            **fields: object) -> Op:
        seq = self._seq(txn, self.replica) + 1
        op = Op(op_key(self.clock.now(), self.replica), seq, type_, node, **fields)  # type: ignore
        self.apply(txn, op, local=True, fresh=fresh)
        return op

    def create(self, txn: KvTxn, parent: Node, name: bytes, kind: Kind,
               attrs: Attrs | None = None, manifest: bytes = b"", size: int = 0,
               known_absent: bool = False) -> Node:
        """Make a new node at parent/name, with a first version when manifest is given
        (one op). Raises ExistsError, NotDirectoryError, InvalidNameError. known_absent: the
        caller has just looked the name up in this transaction."""
        check_name(name)
        if parent.kind != Kind.DIR:
            raise NotDirectoryError("the parent is not a directory")
        if not known_absent and self.lookup(txn, parent.id, name) is not None:
            raise ExistsError(f"{os.fsdecode(name)} exists")
        nid = NodeId.random()
        self._op(txn, OpType.MOVE, nid, fresh=True, parent=parent.id, name=name, kind=kind,
                 manifest=manifest, size=size, attrs=attrs if attrs is not None else {})
        node = self.get(txn, nid)
        assert node is not None
        return node

    def set_content(self, txn: KvTxn, node: Node, manifest: bytes, size: int,
                    attrs: Attrs | None = None, parents: tuple[bytes, ...] | None = None) -> bytes:
        """Record a new version replacing `parents` (default: every current head)."""
        if node.kind == Kind.DIR:
            raise IsDirectoryError("a directory has no content")
        if parents is None:
            parents = tuple(h.key for h in node.heads)
        if node.parent == TRASH and node.move_key:
            spot = txn.get("revived", node.id.raw)
            if spot is not None:            # shown again after a concurrent delete: make it real
                self._op(txn, OpType.MOVE, node.id, parent=NodeId(bytes(spot[:16])),
                         name=bytes(spot[16:]), kind=node.kind)
            else:                           # an unlinked file written through an open handle
                parents += (node.move_key,)
        op = self._op(txn, OpType.CONTENT, node.id, manifest=manifest, size=size,
                      parents=parents, attrs=dict(attrs or {}))
        return op.key

    def set_attrs(self, txn: KvTxn, node: Node, attrs: Attrs) -> None:
        if attrs:
            self._op(txn, OpType.ATTR, node.id, attrs=dict(attrs))

    def rename(self, txn: KvTxn, node: Node, new_parent: Node, new_name: bytes,
               attrs: Attrs | None = None) -> None:
        """POSIX rename: replaces an existing target (a directory only if empty)."""
        check_name(new_name)
        if node.id in (ROOT, TRASH):
            raise InvalidNameError("the root cannot be moved")
        if new_parent.kind != Kind.DIR:
            raise NotDirectoryError("the target's parent is not a directory")
        if new_parent.id == node.id or self._is_ancestor(txn, node.id, new_parent.id):
            raise InvalidNameError("cannot move a directory into itself")
        target_id = self.lookup(txn, new_parent.id, new_name)
        if target_id == node.id:
            return
        if target_id is not None:
            target = self.get(txn, target_id)
            assert target is not None
            if target.kind == Kind.DIR:
                if node.kind != Kind.DIR:
                    raise IsDirectoryError(f"{os.fsdecode(new_name)} is a directory")
                if self.has_children(txn, target.id):
                    raise NotEmptyError(f"{os.fsdecode(new_name)} is not empty")
            elif node.kind == Kind.DIR:
                raise NotDirectoryError(f"{os.fsdecode(new_name)} is not a directory")
            self._op(txn, OpType.MOVE, target.id, parent=TRASH, name=target.id.raw.hex().encode(),
                     kind=target.kind, parents=tuple(h.key for h in target.heads))
        self._op(txn, OpType.MOVE, node.id, parent=new_parent.id, name=new_name, kind=node.kind,
                 attrs=dict(attrs or {}))

    def remove(self, txn: KvTxn, node: Node) -> None:
        """Delete = move to TRASH. Directories must be empty (NotEmptyError)."""
        if node.id in (ROOT, TRASH):
            raise InvalidNameError("the root cannot be removed")
        if node.kind == Kind.DIR and self.has_children(txn, node.id):
            raise NotEmptyError(f"{os.fsdecode(node.name)} is not empty")
        self._op(txn, OpType.MOVE, node.id, parent=TRASH, name=node.id.raw.hex().encode(),
                 kind=node.kind, parents=tuple(h.key for h in node.heads))

    def drop_version(self, txn: KvTxn, node: Node, version: bytes) -> None:
        """Retire one head (deleting a conflict copy): a CONTENT op with no new version."""
        self._op(txn, OpType.CONTENT, node.id, parents=(version,))

    # -- applying ops (local and remote) --------------------------------------------------
    def apply(self, txn: KvTxn, op: Op, local: bool = False, fresh: bool = False) -> bool:
        """Apply an op from any replica, in any order. False if it was already applied.
        local=True is for ops just made here, which are newer than every op applied;
        fresh=True for a local op creating a node with a new random id."""
        if fresh and local and op.type == OpType.MOVE:
            self._apply_fresh(txn, op)
            return True
        if not local:
            if txn.get("ops", op.key) is not None:
                return False
            if physical_ms(key_ts(op.key)) > self.clock.wall_ms() + MAX_SKEW_MS:
                txn.put("held", op.key, op.encode())   # from a clock far ahead: hold it
                return False
            self.clock.observe(key_ts(op.key))
        enc = op.encode()
        undo = _NO_UNDO
        if op.type == OpType.MOVE:
            later = [] if local else \
                [(k, bytes(v)) for k, v in txn.scan("ops", start=op.key) if k != op.key]
            later_moves = []
            for k, v in later:
                later_op, later_undo = split_entry(v)
                if later_op.type == OpType.MOVE:
                    later_moves.append((later_op, later_undo))
            for later_op, later_undo in reversed(later_moves):
                self._undo_move(txn, later_op, later_undo)
            undo = self._do_move(txn, op, local and fresh)
            for later_op, _ in later_moves:
                new_undo = self._do_move(txn, later_op)
                txn.put("ops", later_op.key, _entry(later_op.encode(), new_undo))
        if op.has_content:
            self._do_content(txn, op, local)
        if op.attrs:
            self._do_attrs(txn, op)
        txn.put("ops", op.key, _entry(enc, undo))
        self._advance_vv(txn, op, local)
        if self.listeners:
            txn.cache["ns.new"].append((op, local))  # type: ignore[attr-defined]
        touched = txn.cache.setdefault("ns.touched", set())
        if fresh:   # a new node under a live directory changes no revival
            touched.clear()  # type: ignore[attr-defined]
        else:
            self._refresh_revivals(txn, touched)  # type: ignore[arg-type]
        return True

    def _apply_fresh(self, txn: KvTxn, op: Op) -> None:
        """apply() for a local op creating a node with a new random id, the commonest op of
        an add. It ends in the same state as the general path: nothing is applied later than
        it (no undo/redo), the node has no children (no cycle check), and a new node under a
        live directory changes no revival."""
        assert op.parent is not None
        node = Node(op.node, op.kind, op.parent, op.name, op.key)
        txn.put("dirents", _dirent_key(op.parent, op.name, op.node), bytes([op.kind]) + op.key)
        if op.manifest:
            node.heads.append(Version(op.key, op.manifest, op.size))
            self._retain(txn, op.manifest)
        for k, v in op.attrs.items():
            node.attrs[k] = (op.key, v)
        self._save(txn, node)
        txn.put("ops", op.key, _entry(op.encode(), _undo_state(Node(op.node))))
        self._advance_vv(txn, op, True)
        if self.listeners:
            txn.cache["ns.new"].append((op, True))  # type: ignore[attr-defined]
        touched = txn.cache.get("ns.touched")
        if touched:
            touched.clear()  # type: ignore[attr-defined]

    def held(self, txn: KvTxn) -> list[Op]:
        """Ops held back because their clock was more than MAX_SKEW_MS ahead."""
        return [Op.decode(v) for _, v in txn.scan("held")]

    def release_held(self, txn: KvTxn) -> int:
        """Apply held ops whose time has come; returns how many were applied."""
        due = [op for op in self.held(txn)
               if physical_ms(key_ts(op.key)) <= self.clock.wall_ms() + MAX_SKEW_MS]
        for op in sorted(due, key=lambda o: o.key):
            txn.delete("held", op.key)
            self.apply(txn, op)
        return len(due)

    def _save(self, txn: KvTxn, node: Node) -> None:
        self._cache(txn)[node.id] = node
        txn.cache["ns.dirty"].add(node.id)  # type: ignore[attr-defined]

    def _node(self, txn: KvTxn, nid: NodeId) -> Node:
        return self.get(txn, nid) or Node(nid)

    def _is_ancestor(self, txn: KvTxn, a: NodeId, b: NodeId) -> bool:
        """True if a is b or an ancestor of b."""
        x: NodeId | None = b
        for _ in range(4096):
            if x is None or x in (ROOT, TRASH):
                return False
            if x == a:
                return True
            n = self.get(txn, x)
            x = n.parent if n else None
        return True     # a loop in stored state: treat as a cycle, never extend it

    def _place(self, txn: KvTxn, node: Node, parent: NodeId | None, name: bytes,
               move_key: bytes) -> None:
        touched = txn.cache.setdefault("ns.touched", set())
        touched.add(node.id)  # type: ignore[attr-defined]
        for p in (node.parent, parent):
            if p is not None and p not in (ROOT, TRASH):
                touched.add(p)  # type: ignore[attr-defined]
        if node.parent is not None:
            txn.delete("dirents", _dirent_key(node.parent, node.name, node.id))
        node.parent, node.name, node.move_key = parent, name, move_key
        if parent is not None:
            txn.put("dirents", _dirent_key(parent, name, node.id), bytes([node.kind]) + move_key)
        self._save(txn, node)

    def _do_move(self, txn: KvTxn, op: Op, fresh: bool = False) -> bytes:
        found = None if fresh else self.get(txn, op.node)
        node = found or Node(op.node)
        undo = _undo_state(node)
        if node.kind == Kind.UNKNOWN and op.kind != Kind.UNKNOWN:
            node.kind = op.kind
            if node.parent is not None:   # refresh the kind cached in its dirent
                txn.put("dirents", _dirent_key(node.parent, node.name, node.id),
                        bytes([node.kind]) + node.move_key)
        assert op.parent is not None
        fresh = fresh or False                   # a node just made here has no children
        if op.node in (ROOT, TRASH) or (not fresh and self._is_ancestor(txn, op.node, op.parent)):
            self._save(txn, node)
            return undo          # skipped: it would make a cycle
        self._place(txn, node, op.parent, op.name, op.key)
        return undo

    def _undo_move(self, txn: KvTxn, op: Op, undo: bytes) -> None:
        node = self._node(txn, op.node)
        if undo[:1] == b"\x01":
            key = undo[17:41]
            self._place(txn, node, NodeId(undo[1:17]), undo[41:],
                        b"" if key == b"\x00" * 24 else key)
        else:
            self._place(txn, node, None, b"", b"")

    # -- edit beats delete -----------------------------------------------------------------
    def _refresh_revivals(self, txn: KvTxn, touched: set[NodeId]) -> None:
        """Keep the derived 'revived' entries true for every touched node: a deleted file that
        gained a version its delete did not see, or a deleted directory that gained entries,
        shows again at the place it was deleted from. Derived only from the final state, so
        every replica agrees whatever the order ops arrived in."""
        for _ in range(100_000):
            if not touched:
                return
            nid = touched.pop()
            node = self.get(txn, nid)
            raw = txn.get("revived", nid.raw)
            have = (NodeId(bytes(raw[:16])), bytes(raw[16:])) if raw is not None else None
            want = self._revival_spot(txn, node) if node is not None else None
            # A revived entry has the same dirent key as the node placed at that spot, so
            # undo/redo of its moves can delete it, and a move back to the spot must keep it.
            if want == have:
                if want is not None and node is not None:
                    key = _dirent_key(want[0], want[1], nid)
                    if txn.get("dirents", key) is None:
                        touched.add(want[0])      # its parent gains an entry again
                    txn.put("dirents", key, bytes([node.kind]) + node.move_key)
                continue
            if have is not None:
                if node is None or (node.parent, node.name) != have:
                    txn.delete("dirents", _dirent_key(have[0], have[1], nid))
                txn.delete("revived", nid.raw)
                touched.add(have[0])
            if want is not None and node is not None:
                txn.put("dirents", _dirent_key(want[0], want[1], nid),
                        bytes([node.kind]) + node.move_key)
                txn.put("revived", nid.raw, want[0].raw + want[1])
                touched.add(want[0])

    def _revival_spot(self, txn: KvTxn, node: Node) -> tuple[NodeId, bytes] | None:
        if node.parent != TRASH or not node.move_key:
            return None
        raw = txn.get("ops", node.move_key)
        if raw is None:
            return None
        delete, undo = split_entry(bytes(raw))
        if undo[:1] != b"\x01":
            return None
        spot = (NodeId(undo[1:17]), undo[41:])
        if spot[0] == TRASH:
            return None
        if node.kind == Kind.DIR:
            return spot if self.has_children(txn, node.id) else None
        seen = set(delete.parents)
        for h in node.heads:
            if h.key in seen:
                continue
            head_raw = txn.get("ops", h.key)
            if head_raw is not None and delete.key in split_entry(bytes(head_raw))[0].parents:
                continue                  # written knowing of the delete: stays deleted
            return spot
        return None

    def _do_content(self, txn: KvTxn, op: Op, local: bool = False) -> None:
        node = self._node(txn, op.node)
        if local and not op.parents and not node.heads:
            node.heads.append(Version(op.key, op.manifest, op.size))
            self._retain(txn, op.manifest)
            self._save(txn, node)
            return
        txn.cache.setdefault("ns.touched", set()).add(op.node)  # type: ignore[attr-defined]
        for p in op.parents:
            if txn.put("superseded", op.node.raw + p, b"", overwrite=False):
                for h in [h for h in node.heads if h.key == p]:
                    node.heads.remove(h)
                    self._release(txn, h.manifest)
        if op.manifest and (local or txn.get("superseded", op.node.raw + op.key) is None):
            node.heads.append(Version(op.key, op.manifest, op.size))
            node.heads.sort(key=lambda v: v.key)
            self._retain(txn, op.manifest)
        self._save(txn, node)

    def _do_attrs(self, txn: KvTxn, op: Op) -> None:
        node = self._node(txn, op.node)
        changed = False
        for k, v in op.attrs.items():
            cur = node.attrs.get(k)
            if cur is None or cur[0] < op.key:
                node.attrs[k] = (op.key, v)
                changed = True
        if changed:
            self._save(txn, node)

    def _advance_vv(self, txn: KvTxn, op: Op, local: bool = False) -> None:
        origin = op.origin
        txn.put("opseq", origin + _U64.pack(op.seq)[::-1], op.key)
        if local:
            txn.cache["ns.vv"][origin] = op.seq  # type: ignore[index]
            return
        cur = self._seq(txn, origin)
        if op.seq != cur + 1:
            return
        cur += 1
        while txn.get("opseq", origin + _U64.pack(cur + 1)[::-1]) is not None:
            cur += 1
        txn.cache["ns.vv"][origin] = cur  # type: ignore[index]

    def ops_after(self, txn: KvTxn, origin: bytes, seq: int) -> Iterator[Op]:
        """The ops of one origin with sequence numbers above seq, in order (for sync)."""
        for _, key in txn.scan("opseq", origin, start=origin + _U64.pack(seq + 1)[::-1]):
            raw = txn.get("ops", bytes(key))
            if raw is not None:
                yield split_entry(bytes(raw))[0]


def _entry(enc: bytes, undo: bytes) -> bytes:
    return _U32.pack(len(enc)) + enc + undo


def split_entry(buf: bytes) -> tuple[Op, bytes]:
    (n,) = _U32.unpack_from(buf, 0)
    return Op.decode(buf[4:4 + n]), bytes(buf[4 + n:])


def entry_undo(buf: bytes | memoryview) -> bytes:
    """The undo record of an ops entry, without decoding its op."""
    (n,) = _U32.unpack_from(buf, 0)
    return bytes(buf[4 + n:])
