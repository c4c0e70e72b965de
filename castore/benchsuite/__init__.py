"""The benchmark suite behind `castore bench`: a local cluster of real `castore daemon`
processes on loopback, the measurements, each beside a baseline taken in the same run, and the
JSON and Markdown report.

This package sits just below castore.cli: it starts processes and talks to the daemons through
their gRPC API (castore.rpc), and imports nothing from the CLI. bench/*.py reuse its pieces.
"""
from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30
