"""castore bench: the standard benchmark suite on a local cluster it starts itself, and
--compare of two result files. The measuring code is castore.benchsuite."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from castore.errors import UsageError

QUICK = {"size_mib": 4, "runs": 1, "samples": 40, "small_files": 200}
FULL = {"size_mib": 64, "runs": 3, "samples": 200, "small_files": 1000}


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench", parents=[common],
        help="benchmark a local cluster (started here) against baselines from the same run",
        description="Start N peers on loopback and measure ingest, reads through the drive, "
                    "replicated writes at R = 1..N, propagation latency, small files, a join "
                    "and a kill -9, each beside a baseline measured in the same run. Writes "
                    "results.json, report.md and PNG plots to --out. Needs castore[bench].")
    p.add_argument("--peers", type=int, default=3, metavar="N", help="peers (default 3)")
    p.add_argument("--redundancy", type=int, default=2, metavar="R",
                   help="R of the cluster for reads, latency, join and repair (default 2); "
                        "writes are measured at every R from 1 to N")
    p.add_argument("--size-mib", type=int, metavar="MIB",
                   help=f"data per run (default {FULL['size_mib']}, --quick {QUICK['size_mib']})")
    p.add_argument("--runs", type=int, help=f"runs per figure, the median is reported "
                   f"(default {FULL['runs']}, --quick {QUICK['runs']})")
    p.add_argument("--samples", type=int, help=f"propagation latency samples "
                   f"(default {FULL['samples']}, --quick {QUICK['samples']})")
    p.add_argument("--small-files", type=int, metavar="COUNT", help=f"4 KiB files per run "
                   f"(default {FULL['small_files']}, --quick {QUICK['small_files']})")
    p.add_argument("--down-out-interval", type=float, default=3.0, metavar="SECONDS",
                   help="the peers' down-out interval for the kill -9 step (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes, one run (for CI)")
    p.add_argument("--out", metavar="DIR",
                   help="where results go (default ./castore-bench-<timestamp>)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep the peers' homes and test data in DIR/work")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two result files instead of running the suite")
    p.set_defaults(run=cmd_bench)


def cmd_bench(ctx: Any) -> int:
    args = ctx.args
    if args.compare:
        return _compare(ctx, Path(args.compare[0]), Path(args.compare[1]))
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        raise UsageError("castore bench needs matplotlib for its plots: "
                         "pip install 'castore[bench]'") from None
    from castore.benchsuite import report
    from castore.benchsuite.progress import Steps
    from castore.benchsuite.suite import Params, run_suite, step_count
    sizes = QUICK if args.quick else FULL
    params = Params(peers=args.peers, redundancy=args.redundancy,
                    size_mib=args.size_mib or sizes["size_mib"], runs=args.runs or sizes["runs"],
                    samples=args.samples or sizes["samples"],
                    small_files=args.small_files or sizes["small_files"],
                    down_out=args.down_out_interval)
    params.check()
    out = Path(args.out or f"castore-bench-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    if (out / "work").exists() or (out / report.RESULTS).exists():
        raise UsageError(f"{out} already holds a bench run: pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    progress = Steps(step_count(params) + 1)
    print(f"castore bench: {params.peers} peers, R={params.redundancy}, {params.size_mib} MiB "
          f"x {params.runs} run(s) -> {out}", file=sys.stderr)
    results = run_suite(params, out, progress, keep_work=args.keep_work)
    with progress.step("report") as s:
        written = report.write(out, results)
        s.result(", ".join(p.name for p in written))
    if ctx.json:
        ctx.emit({"out": str(out), "figures": results["figures"]})
        return 0
    for f in results["figures"]:
        print(f"{f['name']:<18} {f['value']:>10.4g} {f['unit']:<8} baseline "
              f"{f['baseline']:>10.4g} ({f['baseline_label']})  ratio {f['ratio']:.3g}x")
    print(f"wrote {out / 'report.md'}")
    return 0


def _compare(ctx: Any, a_path: Path, b_path: Path) -> int:
    from castore.benchsuite import report
    a, b = report.load(a_path), report.load(b_path)
    rows, text = report.compare(a, b)
    if ctx.json:
        print(json.dumps({"a": str(a_path), "b": str(b_path), "figures": rows},
                         sort_keys=True))
    else:
        print(f"A: {a_path}\nB: {b_path}\n{text}")
    return 0
