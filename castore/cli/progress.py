"""A progress line on stderr, for terminals only."""
from __future__ import annotations

import sys
import time


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class Bar:
    """Redraws at most ten times a second; finish() clears the line."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, done: int, total: int, nbytes: int = 0, total_bytes: int = 0) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        rate = nbytes / max(now - self.start, 1e-6)
        frac = nbytes / total_bytes if total_bytes else (done / total if total else 0.0)
        width = 24
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        counts = f"{done}/{total}" if total else f"{done}"
        sys.stderr.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {counts} "
                         f"{_size(nbytes)} {_size(rate)}/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
