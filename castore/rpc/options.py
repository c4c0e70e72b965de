"""Channel and server options shared by both ends of the client API (kept apart from the
servicer, so a client loads no server code)."""
from __future__ import annotations

from typing import Any


def options(max_message: int) -> list[tuple[str, Any]]:
    return [("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
            ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
            ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20)]
