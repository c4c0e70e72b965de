"""castore: a peer-to-peer, content-addressed store with a network-drive face."""
from __future__ import annotations

__version__ = "0.1.0"

from castore.errors import (CastoreError, ChunkNotFoundError, IntegrityError,  # noqa: E402
                            PathNotFoundError, StorageFullError)
from castore.ids import ChunkId, NodeId  # noqa: E402
from castore.store import BlobStore, MemoryStore  # noqa: E402

__all__ = ["BlobStore", "CastoreError", "ChunkId", "ChunkNotFoundError", "IntegrityError",
           "MemoryStore", "NodeId", "PathNotFoundError", "StorageFullError", "__version__"]
