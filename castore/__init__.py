"""castore: a peer-to-peer, content-addressed store with a network-drive face."""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from castore.errors import (CastoreError, ChunkNotFoundError, IntegrityError,  # noqa: E402
                            PathNotFoundError, StorageFullError)
from castore.ids import ChunkId, NodeId  # noqa: E402

if TYPE_CHECKING:
    from castore.store import BlobStore, MemoryStore

__all__ = ["BlobStore", "CastoreError", "ChunkId", "ChunkNotFoundError", "IntegrityError",
           "MemoryStore", "NodeId", "PathNotFoundError", "StorageFullError", "__version__"]


def __getattr__(name: str) -> object:
    # The store (and zstandard under it) loads on first use: a CLI talking to the daemon
    # never needs it, and every CLI run is a fresh process.
    if name in ("BlobStore", "MemoryStore"):
        from castore import store
        return getattr(store, name)
    raise AttributeError(f"module 'castore' has no attribute {name!r}")
