"""The plain workloads the figures time, on castore and on their baselines alike: test data,
reading a file, creating many small files, BLAKE3 hashing, and the statistics over runs.
No castore imports: the same code runs against the drive and against local disk."""
from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1 << 20


def median_of(runs: int, fn: Callable[[int], float]) -> tuple[float, list[float]]:
    values = [fn(i) for i in range(runs)]
    return statistics.median(values), values


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def drop_caches() -> bool:
    """Drop the page cache (root only). Returns False if not possible."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make_random_file(path: Path, size: int, seed: int = 1) -> None:
    """size incompressible bytes, the same for the same seed."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n


def blake3_seconds(path: Path) -> float:
    """Seconds to BLAKE3-hash a file (memory-mapped, all cores): the floor of any ingest."""
    from blake3 import blake3

    def go() -> None:
        h = blake3(max_threads=blake3.AUTO)
        h.update_mmap(str(path))
        h.digest()
    return timed(go)


def read_file(path: Path) -> tuple[float, int]:
    """(seconds, bytes) to read a file sequentially in 1 MiB reads."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    start = time.perf_counter()
    n = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            k = os.readv(fd, [view])
            if not k:
                break
            n += k
    finally:
        os.close(fd)
    return time.perf_counter() - start, n


def creates(dirpath: Path, count: int, durable: bool, size: int = 4096) -> float:
    """Seconds to create count files of size bytes each in a new directory (create, write,
    close; with durable, fdatasync before close)."""
    dirpath.mkdir()
    body = os.urandom(size)
    start = time.perf_counter()
    for i in range(count):
        fd = os.open(dirpath / f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, body)
        if durable:
            os.fdatasync(fd)
        os.close(fd)
    return time.perf_counter() - start
