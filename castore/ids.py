"""Identifiers: ChunkId (BLAKE3-256 of a chunk's bytes) and NodeId (random 128-bit namespace node).

Imports nothing of castore but errors-free stdlib and blake3.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from blake3 import blake3

_PARALLEL_FROM = 1 << 20   # multi-threaded BLAKE3 pays off only from ~1 MiB buffers


class _RandomIds:
    """16-byte random ids cut from 4 KiB of os.urandom at a time: one getrandom call per 256
    ids instead of one per id (an add of many small files creates a node per file, and each
    call gives up the GIL). The bytes left are forgotten in a forked child, so parent and
    child never hand out the same id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._buf, self._pos = b"", 0

    def take(self) -> bytes:
        with self._lock:
            if self._pos + 16 > len(self._buf):
                self._buf, self._pos = os.urandom(4096), 0
            self._pos += 16
            return self._buf[self._pos - 16:self._pos]


_random_ids = _RandomIds()


class _Digest:
    """What ChunkId and PeerId share: 32 bytes, hex for humans, a short form for logs."""

    __slots__ = ()
    digest: bytes
    _noun = "id"

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise ValueError(f"{type(self).__name__} needs 32 bytes, got {len(self.digest)}")

    @classmethod
    def from_hex(cls, text: str):  # type: ignore[no-untyped-def]
        """Parse 64 hex digits; raises ValueError on anything else."""
        if len(text) != 64:
            raise ValueError(f"a {cls._noun} is 64 hex digits, got {len(text)} characters")
        return cls(bytes.fromhex(text))  # type: ignore[call-arg]

    def __hash__(self) -> int:
        return hash(self.digest)

    @property
    def hex(self) -> str:
        return self.digest.hex()

    @property
    def short(self) -> str:
        return self.digest.hex()[:10]

    def __str__(self) -> str:
        return self.digest.hex()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.short})"


@dataclass(frozen=True, slots=True, order=True, repr=False)
class ChunkId(_Digest):
    """BLAKE3-256 digest of a chunk's (uncompressed) bytes: the only way chunks are named.

    Manifests are named the same way, by the digest of their encoding.
    """

    digest: bytes

    _noun = 'content id'
    __hash__ = _Digest.__hash__     # keep the cheap hash (dataclass would make its own)

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> ChunkId:
        if len(data) >= _PARALLEL_FROM:
            return cls(blake3(data, max_threads=blake3.AUTO).digest())
        return cls(blake3(data).digest())



@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A namespace node (file, directory or symlink): 128 random bits, so a rename is one op."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != 16:
            raise ValueError(f"NodeId needs 16 bytes, got {len(self.raw)}")

    def __hash__(self) -> int:
        return hash(self.raw)

    @classmethod
    def random(cls) -> NodeId:
        return cls(_random_ids.take())

    @property
    def short(self) -> str:
        return self.raw.hex()[:8]

    def __repr__(self) -> str:
        return f"NodeId({self.short})"


ROOT = NodeId(b"\x00" * 16)
TRASH = NodeId(b"\x00" * 15 + b"\x01")


@dataclass(frozen=True, slots=True, order=True, repr=False)
class PeerId(_Digest):
    """A peer: BLAKE3-256 of its certificate's DER bytes (Syncthing-style), so an id cannot be
    claimed without the key. Ordered by digest; placement breaks exact score ties by it."""

    digest: bytes

    _noun = 'peer id'
    __hash__ = _Digest.__hash__     # keep the cheap hash (dataclass would make its own)

    @classmethod
    def of(cls, certificate_der: bytes) -> PeerId:
        return cls(blake3(certificate_der).digest())

