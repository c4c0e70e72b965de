"""Shared helpers for the benchmarks: timing, medians, test data, JSON and plots.

Benchmarks use castore's public API and CLI only; they are plain scripts, not collected by
pytest. Every figure is the median of several runs, next to a baseline measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def median_of(runs: int, fn: Callable[[int], float]) -> tuple[float, list[float]]:
    values = [fn(i) for i in range(runs)]
    return statistics.median(values), values


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_caches() -> bool:
    """Drop the page cache (root only). Returns False if not possible."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def castore_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("castore")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "castore"]


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def make_random_file(path: Path, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


def make_real_file(path: Path, size: int) -> int:
    """Concatenate files from /usr/share and /usr/lib (compressible, real-world data)."""
    written = 0
    with open(path, "wb") as out:
        for root in ("/usr/share", "/usr/lib", "/usr/bin"):
            for dirpath, _, names in os.walk(root):
                for name in sorted(names):
                    p = os.path.join(dirpath, name)
                    try:
                        if not os.path.isfile(p) or os.path.islink(p):
                            continue
                        with open(p, "rb") as f:
                            data = f.read(size - written)
                    except OSError:
                        continue
                    out.write(data)
                    written += len(data)
                    if written >= size:
                        return written
    return written


def make_tree(root: Path, files: int, size: int = 4096, seed: int = 2,
              per_dir: int = 200) -> None:
    """files small files of `size` bytes (half random, half text) in dirs of per_dir."""
    rng = random.Random(seed)
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True, exist_ok=True)
        body = rng.randbytes(size // 2) + (f"line {i} of the castore bench tree\n" *
                                           (size // 32 + 1)).encode()[:size - size // 2]
        (d / f"f{i:06d}.txt").write_bytes(body)


def mutate_tree(src: Path, dst: Path, fraction: float, seed: int = 3) -> None:
    """Copy src to dst, changing `fraction` of the files (a mostly identical second version)."""
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    rng = random.Random(seed)
    files = sorted(p for p in dst.rglob("*") if p.is_file())
    for p in rng.sample(files, int(len(files) * fraction)):
        p.write_bytes(rng.randbytes(p.stat().st_size))


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "kernel": platform.release(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


def emit(**fields: Any) -> None:
    """One JSON line per figure on stdout."""
    print(json.dumps(fields, sort_keys=True), flush=True)
