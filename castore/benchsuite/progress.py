"""Progress of a bench run on stderr: one line per step ("[3/9] replicated write R=2 ...") and
its result; on a terminal the running step also shows a live elapsed-time counter."""
from __future__ import annotations

import sys
import threading
import time
from types import TracebackType
from typing import TextIO


class Steps:
    """Numbered steps; use `with steps.step("name"):` around each and `steps.result(text)`."""

    def __init__(self, total: int, out: TextIO | None = None, live: bool | None = None) -> None:
        self.total = total
        self.out = out or sys.stderr
        self.live = self.out.isatty() if live is None else live
        self.n = 0
        self._label = ""
        self._result = ""
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._start = 0.0

    def step(self, label: str) -> Steps:
        self.n += 1
        self._label = f"[{self.n}/{self.total}] {label}"
        self._result = ""
        return self

    def result(self, text: str) -> None:
        self._result = text

    def __enter__(self) -> Steps:
        self._start = time.monotonic()
        if self.live:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="castore-bench-progress",
                                            daemon=True)
            self._ticker.start()
        else:
            self._write(f"{self._label} ...\n")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join(2)
            self._ticker = None
        took = time.monotonic() - self._start
        if kind is None:
            end = f": {self._result}" if self._result else " done"
        elif issubclass(kind, KeyboardInterrupt):
            end = ": interrupted"
        else:
            end = ": failed"
        prefix = "\r\033[K" if self.live else ""
        self._write(f"{prefix}{self._label}{end} ({took:.1f} s)\n")

    def note(self, text: str) -> None:
        prefix = "\r\033[K" if self.live else ""
        self._write(f"{prefix}{text}\n")

    def _tick(self) -> None:
        spin = "|/-\\"
        i = 0
        while not self._stop.wait(0.25):
            took = time.monotonic() - self._start
            self._write(f"\r\033[K{self._label} {spin[i % 4]} {took:.0f} s")
            i += 1

    def _write(self, text: str) -> None:
        with self._lock:
            try:
                self.out.write(text)
                self.out.flush()
            except (OSError, ValueError):
                pass
