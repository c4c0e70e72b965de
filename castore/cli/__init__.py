"""The castore command line: argparse subcommands built on the Repo API, served by the local
daemon when one runs and by the repo opened directly when none does (as kubo does offline).

Exit codes: 0 ok; 1 a check found problems; 2 usage, config or repo error, or a request over
a limit; 3 not found; 4 integrity error; 5 daemon unreachable or timed out; 7 disk full;
130 interrupted.
A CastoreError prints one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from castore import __version__
from castore.config import Config
from castore.errors import CastoreError

EXIT_PROBLEMS = 1
EXIT_INTERRUPTED = 130


class Context:
    """What every command gets: parsed args, config, and how to reach the repo."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = args.json
        self.config = Config.load(args.home)

    @contextmanager
    def api(self, offline_ok: bool = True) -> Iterator[Any]:
        """The running daemon (RemoteRepo), or with offline_ok the repo opened directly."""
        # no socket, no daemon: the offline path never loads gRPC (a tenth of a second)
        if self.config.socket_path.exists():
            from castore.rpc.client import RemoteRepo
            with RemoteRepo(self.config) as remote:
                if remote.serving():          # the command's calls reuse this connection
                    _freeze_startup()
                    yield remote
                    return
        if not offline_ok:
            from castore.errors import PeerUnavailableError
            raise PeerUnavailableError(f"no castore daemon is running on {self.config.home} "
                                       "(start one with 'castore daemon')")
        from castore.repo import Repo
        with Repo.open(self.config) as repo:
            _freeze_startup()
            yield repo

    def emit(self, value: Any, text: str | None = None) -> None:
        """Print a result: JSON with --json, else the text form."""
        if self.json:
            print(json.dumps(value, default=_jsonable, sort_keys=True))
        elif text is not None:
            print(text)

    @property
    def progress(self) -> bool:
        return not self.json and sys.stderr.isatty() and not getattr(self.args, "quiet", False)


def _freeze_startup() -> None:
    """Keep the objects of start-up (modules, the parser, the open repo or channel) out of
    the cyclic garbage collector for the rest of this process, which runs one command: they
    live until it exits, and a command that makes many objects (an add of many files) would
    otherwise rescan them all in each full collection, and once more at exit (about 20 ms
    of the exit of an add through the daemon)."""
    gc.freeze()


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="backslashreplace")
    if hasattr(v, "__dataclass_fields__"):
        from dataclasses import asdict
        return asdict(v)
    raise TypeError(f"cannot encode {type(v).__name__}")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other castore error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"castore: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    from castore.cli import cluster, files, repo_cmds
    parser = _Parser(prog="castore", description=(
        "castore: a peer-to-peer content-addressed store with a network drive."))
    parser.add_argument("--version", action="version", version=f"castore {__version__}")
    common = _Parser(add_help=False)
    common.add_argument("--home", help="repo directory (default: $CASTORE_HOME or ~/.castore)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (repo_cmds, files, cluster):
        module.add_parsers(sub, common)
    try:
        from castore.cli import mount
        mount.add_parsers(sub, common)
    except ImportError:  # pragma: no cover - the mount commands ship with the package
        pass
    from castore.cli import bench
    bench.add_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("CASTORE_LOG", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ctx = Context(args)
        return int(args.run(ctx) or 0)
    except CastoreError as exc:
        print(f"castore: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("castore: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as exc:               # a local file the command was given
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"castore: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
