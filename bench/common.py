"""Shared helpers for the benchmarks: test data, JSON output, machine facts.

Benchmarks are plain scripts, not collected by pytest. The measuring code they share with
`castore bench` (timing, medians, random data, dropping caches) lives in
castore.benchsuite and is re-exported here. Every figure is the median of several runs, next
to a baseline measured in the same run.
"""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from castore.benchsuite.processes import castore_argv as castore_cmd  # noqa: E402,F401
from castore.benchsuite.workloads import (drop_caches, make_random_file,  # noqa: E402,F401
                                          median_of, timed)

__all__ = ["RESULTS", "castore_cmd", "drop_caches", "emit", "machine", "make_random_file",
           "make_real_file", "make_tree", "median_of", "mutate_tree", "run", "timed",
           "write_json"]

RESULTS = Path(__file__).resolve().parent / "results"


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


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
