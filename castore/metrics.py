"""Prometheus metrics: a small registry of counters, gauges and histograms with labels, the
text exposition format, and an optional HTTP endpoint (stdlib http.server in a thread).

Imports only the standard library, so every layer may count things.
"""
from __future__ import annotations

import bisect
import http.server
import threading
from collections import defaultdict
from collections.abc import Callable

Labels = tuple[tuple[str, str], ...]
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{v}"' for k, v in labels)
    return "{" + body + "}"


class Registry:
    """Thread-safe metric values by name and label set. Gauges may be computed on scrape."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, list[float]]] = defaultdict(dict)
        self._collectors: list[Callable[[Registry], None]] = []

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._mutex:
            table = self._values[name]
            table[key] = table.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._mutex:
            self._values[name][tuple(sorted(labels.items()))] = value

    def clear(self, name: str) -> None:
        with self._mutex:
            self._values.pop(name, None)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._mutex:
            h = self._hists[name].get(key)
            if h is None:
                h = self._hists[name][key] = [0.0] * (len(_BUCKETS) + 2)
            h[bisect.bisect_left(_BUCKETS, seconds)] += 1
            h[-1] += seconds

    def collector(self, fn: Callable[[Registry], None]) -> None:
        """fn(registry) runs before each scrape, to set computed gauges."""
        self._collectors.append(fn)

    def value(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> str:
        for fn in self._collectors:
            try:
                fn(self)
            except Exception:  # a failing collector must not break the scrape
                pass
        lines: list[str] = []
        with self._mutex:
            for name in sorted(set(self._values) | set(self._hists)):
                kind, text = self._help.get(name, ("gauge", name))
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for labels, v in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{_fmt(labels)} {v:g}")
                for labels, h in sorted(self._hists.get(name, {}).items()):
                    acc = 0.0
                    for bound, n in zip(_BUCKETS, h):
                        acc += n
                        lines.append(f"{name}_bucket{_fmt(labels + (('le', str(bound)),))} "
                                     f"{acc:g}")
                    acc += h[len(_BUCKETS)]
                    lines.append(f"{name}_bucket{_fmt(labels + (('le', '+Inf'),))} {acc:g}")
                    lines.append(f"{name}_sum{_fmt(labels)} {h[-1]:g}")
                    lines.append(f"{name}_count{_fmt(labels)} {acc:g}")
        return "\n".join(lines) + "\n"


def serve_http(registry: Registry, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve GET /metrics (text format 0.0.4) in a daemon thread; returns the server (its
    server_address carries the bound port; call shutdown() to stop)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "castore serves /metrics only")
                return
            body = registry.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="castore-metrics", daemon=True).start()
    return server
