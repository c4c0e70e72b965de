"""A malicious castore peer for tests: a real daemon (valid member certificate, joined with a
real token) whose peer service serves chunks with a flipped byte and whose pushes carry
flipped bytes. Run as: python tests/evil_peer.py daemon --home H --listen ... --token T"""
from __future__ import annotations

import sys

from castore.rpc import peer_client, peer_server
from castore.store import StoredChunk


def _flip(s: StoredChunk) -> StoredChunk:
    return StoredChunk(s.codec, s.raw_len, bytes([s.data[0] ^ 0x55]) + s.data[1:])


_get = peer_server.PeerServicer.GetBlobs
_put = peer_client.RemoteStore.put_stored_many


def evil_get(self, request, context):  # type: ignore[no-untyped-def]
    for blob in _get(self, request, context):
        blob.data = bytes([blob.data[0] ^ 0x55]) + blob.data[1:]
        yield blob


def evil_put(self, items):  # type: ignore[no-untyped-def]
    return _put(self, [(c, _flip(s)) for c, s in items])


peer_server.PeerServicer.GetBlobs = evil_get  # type: ignore[method-assign]
peer_client.RemoteStore.put_stored_many = evil_put  # type: ignore[method-assign]

if __name__ == "__main__":
    from castore.cli import main
    sys.exit(main(sys.argv[1:]))
