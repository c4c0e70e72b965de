"""Hybrid logical clock: 48 bits of wall-clock milliseconds and a 16-bit counter in one u64.

Timestamps from one clock are strictly increasing and stay close to wall time; receiving a
remote timestamp moves the clock past it (max-merge), so causality is kept across peers.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

COUNTER_BITS = 16
_COUNTER_MASK = (1 << COUNTER_BITS) - 1


def physical_ms(ts: int) -> int:
    return ts >> COUNTER_BITS


class HybridClock:
    """Thread-safe HLC. `now()` for a local event, `observe(ts)` for a received timestamp."""

    def __init__(self, last: int = 0, wall_ms: Callable[[], int] | None = None) -> None:
        self._last = last
        self._wall_ms = wall_ms or (lambda: time.time_ns() // 1_000_000)
        self._mutex = threading.Lock()

    def wall_ms(self) -> int:
        return self._wall_ms()

    @property
    def last(self) -> int:
        return self._last

    def now(self) -> int:
        with self._mutex:
            wall = self._wall_ms() << COUNTER_BITS
            self._last = wall if wall > self._last else self._last + 1
            return self._last

    def observe(self, ts: int) -> None:
        with self._mutex:
            if ts > self._last:
                self._last = ts
