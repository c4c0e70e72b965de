"""A peer's holdings as replication sees them: chunks and manifests under one id space.

Manifests are content-addressed like chunks, so they replicate like chunks: on the wire a
manifest travels as a StoredChunk with codec MANIFEST (its encoding, uncompressed) and lands
in the manifests table with no references. Owns no data of its own; uses the LMDB store and
Files. Must not import grpc, castore._proto or castore.rpc.
"""
from __future__ import annotations

from collections.abc import Iterator
from castore import codec
from castore.errors import ChunkNotFoundError, IntegrityError
from castore.files import Files, Manifest
from castore.ids import ChunkId
from castore.store import StoredChunk
from castore.store.lmdb import QUIET, LmdbEnv, LmdbStore, LmdbTxn
from castore.store.memory import verify
from castore.store.readahead import Readahead, address

MANIFEST = 0x4D          # codec tag of a manifest on the wire ('M'); never stored as a chunk
_REFS = 4                # the manifests table prefixes each body with a 4-byte ref count
_READ_GROUP = 8          # chunks copied out per read transaction by get_stored_many


class RepoHoldings:
    """LocalStore over one repo's LMDB environment. Thread-safe."""

    def __init__(self, env: LmdbEnv, store: LmdbStore, files: Files) -> None:
        self.env = env
        self.store = store
        self.files = files

    def has_many(self, ids: list[ChunkId]) -> list[bool]:
        def run(t: LmdbTxn) -> list[bool]:
            return [self.store.has_in(t, c) or _has_manifest(t, c) for c in ids]
        return self.env.read(run)

    def has(self, cid: ChunkId) -> bool:
        return self.has_many([cid])[0]

    def get_stored(self, cid: ChunkId) -> StoredChunk:
        try:
            return self.store.get_stored(cid)
        except ChunkNotFoundError:
            pass

        def body(t: LmdbTxn) -> bytes | None:
            raw = t.get("manifests", cid.digest)
            return bytes(raw[_REFS:]) if raw is not None and len(raw) > _REFS else None
        data = self.env.read(body)
        if data is None:
            raise ChunkNotFoundError(f"no chunk or manifest {cid} here")
        return StoredChunk(MANIFEST, len(data), data)

    def get_stored_many(self, ids: list[ChunkId]) -> Iterator[tuple[ChunkId, StoredChunk]]:
        """The held ones of ids as stored, in the order they lie in the map rather than in
        the given order, and with readahead: a cold read of chunks in id order would be one
        4 KiB page fault after another (see castore.store.readahead). Manifests come last.
        Each group of chunks is copied out of a short read transaction."""
        def locate(t: LmdbTxn) -> list[tuple[int, ChunkId]]:
            out = []
            for cid in ids:
                try:
                    _, _, view = self.store.view_in(t, cid)
                except ChunkNotFoundError:
                    out.append((1 << 64, cid))      # a manifest, or gone: read last
                    continue
                out.append((address(view)[0], cid))
            return out
        order = [c for _, c in sorted(self.env.read(locate), key=lambda x: x[0])]
        ra = Readahead()

        def group(t: LmdbTxn, part: list[ChunkId]) -> list[tuple[ChunkId, StoredChunk]]:
            got = []
            for cid in part:
                try:
                    tag, raw_len, view = self.store.view_in(t, cid, ra)
                    got.append((cid, StoredChunk(tag, raw_len, bytes(view))))
                except ChunkNotFoundError:
                    raw = t.get("manifests", cid.digest)
                    if raw is not None and len(raw) > _REFS:
                        body = bytes(raw[_REFS:])
                        got.append((cid, StoredChunk(MANIFEST, len(body), body)))
            return got
        for i in range(0, len(order), _READ_GROUP):
            part = order[i:i + _READ_GROUP]
            yield from self.env.read(lambda t: group(t, part))

    def put_stored_many(self, items: list[tuple[ChunkId, StoredChunk]]
                        ) -> tuple[list[ChunkId], list[ChunkId]]:
        """Verify and store chunks received from a peer in one durable commit. Returns
        (stored or already held, rejected as not matching their ids)."""
        ok: list[tuple[ChunkId, StoredChunk]] = []
        rejected: list[ChunkId] = []
        for cid, chunk in items:
            try:
                if chunk.codec == MANIFEST:
                    verify(cid, chunk.data)
                    Manifest.decode(chunk.data)
                else:
                    verify(cid, codec.decode(chunk.codec, chunk.data, chunk.raw_len))
            except IntegrityError:
                rejected.append(cid)
                continue
            ok.append((cid, chunk))

        def run(t: LmdbTxn) -> None:
            t.cache[QUIET] = True
            for cid, chunk in ok:
                if chunk.codec == MANIFEST:
                    if t.get("manifests", cid.digest) is None:
                        t.put("manifests", cid.digest, (0).to_bytes(_REFS, "little") +
                              chunk.data)
                    elif len(t.get("manifests", cid.digest) or b"") <= _REFS:
                        refs = bytes(t.get("manifests", cid.digest) or b"\0\0\0\0")
                        t.put("manifests", cid.digest, refs + chunk.data)
                else:
                    self.store.put_encoded_in(t, cid, chunk.raw_len, chunk.codec, chunk.data)
        if ok:
            self.env.write(run, bulk=True)
        return [c for c, _ in ok], rejected

    def delete_many(self, ids: list[ChunkId]) -> None:
        """Drop chunks, and manifests no namespace version references, in one transaction."""
        def run(t: LmdbTxn) -> None:
            for cid in ids:
                if self.store.delete_in(t, cid):
                    continue
                raw = t.get("manifests", cid.digest)
                if raw is not None and int.from_bytes(bytes(raw[:_REFS]), "little") == 0:
                    t.delete("manifests", cid.digest)
        if ids:
            self.env.write(run)

    def ids(self, after: ChunkId | None = None) -> Iterator[ChunkId]:
        """Every chunk and manifest id held, sorted."""
        limit = 2048

        def page(t: LmdbTxn, start: bytes | None) -> tuple[list[bytes], bytes | None]:
            out: list[bytes] = []
            bound: bytes | None = None
            for db in ("chunkmeta", "manifests"):
                got = 0
                for k, v in t.scan(db, start=start):
                    k = bytes(k)
                    if start is not None and k <= start:
                        continue
                    got += 1
                    if db != "manifests" or len(v) > _REFS:
                        out.append(k)
                    if got >= limit:
                        bound = k if bound is None else min(bound, k)
                        break
            keys = sorted(set(out))
            return ([k for k in keys if bound is None or k <= bound], bound)
        start = after.digest if after else None
        while True:
            keys, bound = self.env.read(lambda t: page(t, start))
            for k in keys:
                yield ChunkId(k)
            if bound is None:
                return
            start = bound

    def manifest_chunks(self, cid: ChunkId) -> list[ChunkId]:
        """The chunk ids a content id stands for (itself for a single chunk)."""
        def run(t: LmdbTxn) -> list[ChunkId]:
            if self.files.has_manifest_in(t, cid):
                try:
                    return list(self.files.load_in(t, cid).chunks)
                except ChunkNotFoundError:
                    return []
            return []
        return self.env.read(run)


def _has_manifest(t: LmdbTxn, cid: ChunkId) -> bool:
    raw = t.get("manifests", cid.digest)
    return raw is not None and len(raw) > _REFS

