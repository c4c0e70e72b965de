"""The network baseline: raw gRPC on loopback, with no castore code on either side. A server
process that sinks a client stream of 1 MiB messages (throughput) and echoes an empty unary
call (round-trip latency).

    python -m castore.benchsuite.rawgrpc PORT      # the server, as the bench starts it
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from castore.benchsuite import MiB
from castore.benchsuite.processes import Processes

READY_TIMEOUT = 30.0         # seconds for the server to accept calls
CALL_TIMEOUT = 300.0         # seconds for one streamed run


def serve(port: int) -> None:
    """Serve bench.Raw/Sink and bench.Raw/Ping on 127.0.0.1:port until killed."""
    def sink(requests: Any, context: Any) -> bytes:
        n = 0
        for r in requests:
            n += len(r)
        return str(n).encode()

    def ping(request: bytes, context: Any) -> bytes:
        return request

    opts = [("grpc.max_receive_message_length", 16 * MiB),
            ("grpc.experimental.tcp_read_chunk_size", 4 * MiB)]
    server = grpc.server(ThreadPoolExecutor(4), options=opts)
    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Sink": grpc.stream_unary_rpc_method_handler(sink),
                      "Ping": grpc.unary_unary_rpc_method_handler(ping)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


class RawGrpc:
    """A running baseline server (a child process) and a channel to it."""

    def __init__(self, procs: Processes, port: int) -> None:
        self._procs = procs
        self._proc = procs.spawn([sys.executable, "-m", "castore.benchsuite.rawgrpc",
                                  str(port)])
        self._channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 * MiB)])
        try:
            grpc.channel_ready_future(self._channel).result(timeout=READY_TIMEOUT)
        except grpc.FutureTimeoutError:
            self.close()
            raise RuntimeError(f"the raw gRPC server did not start within {READY_TIMEOUT} s"
                               ) from None

    def stream_mb_s(self, size: int) -> float:
        """MB/s of one client stream of size bytes in 1 MiB messages."""
        call = self._channel.stream_unary("/bench.Raw/Sink")
        block = b"x" * MiB
        start = time.perf_counter()
        call(iter([block] * max(1, size // MiB)), timeout=CALL_TIMEOUT, wait_for_ready=True)
        return max(1, size // MiB) * MiB / (time.perf_counter() - start) / 1e6

    def ping_ms(self, samples: int) -> list[float]:
        """Round-trip times of empty unary calls, in milliseconds."""
        call = self._channel.unary_unary("/bench.Raw/Ping")
        out = []
        for _ in range(samples):
            start = time.perf_counter()
            call(b"", timeout=10.0)
            out.append((time.perf_counter() - start) * 1e3)
        return out

    def close(self) -> None:
        self._channel.close()
        self._procs.stop(self._proc, timeout=5.0)


def raw_grpc(procs: Processes, port: int, size: int, runs: int) -> list[float]:
    """MB/s of runs raw gRPC client streams of size bytes on loopback."""
    raw = RawGrpc(procs, port)
    try:
        return [raw.stream_mb_s(size) for _ in range(runs)]
    finally:
        raw.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
