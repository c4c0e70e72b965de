"""What a bench run leaves behind: results.json, the PNG plots and report.md (self-contained:
it refers only to the PNGs beside it), and the comparison of two result files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from castore.benchsuite.cluster import BenchError

RESULTS = "results.json"
PLOTS = {"throughput": "throughput.png", "repair": "repair.png", "latency": "latency.png"}


class ResultFileError(BenchError):
    """A result file given to --compare is missing or is not a castore bench result."""

    exit_code = 2


def load(path: Path) -> dict[str, Any]:
    """A result file, checked enough to compare it. ResultFileError otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ResultFileError(f"{path}: is a directory, not a result file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(f"{path}: cannot read: {exc}") from None
    except ValueError as exc:
        raise ResultFileError(f"{path}: not JSON ({exc})") from None
    figs = data.get("figures") if isinstance(data, dict) else None
    if not isinstance(figs, list) or not all(
            isinstance(f, dict) and {"name", "value", "baseline"} <= set(f) for f in figs):
        raise ResultFileError(f"{path}: not a castore bench result (no list of figures)")
    return dict(data)


def write(out: Path, results: dict[str, Any]) -> list[Path]:
    """Write results.json, the plots and report.md into out; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / RESULTS]
    paths[0].write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    paths += plot(out, results)
    md = out / "report.md"
    md.write_text(markdown(results))
    paths.append(md)
    return paths


# -- plots --------------------------------------------------------------------------------
def plot(out: Path, results: dict[str, Any]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    series = results.get("series", {})
    writes = series.get("writes", [])
    raw = series.get("raw_grpc_MBps", [])
    if writes:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(writes))
        ax.bar([x - 0.2 for x in xs], [w["ack_median"] for w in writes], 0.4,
               label="W copies acked (add --wait)")
        ax.bar([x + 0.2 for x in xs], [w["placed_median"] for w in writes], 0.4,
               label="every copy placed")
        if raw:
            base = sorted(raw)[len(raw) // 2]
            ax.axhline(base, color="k", ls="--", label="raw gRPC stream (baseline)")
            for x, w in zip(xs, writes):
                ax.annotate(f"{w['ack_median'] / base:.2f}x", (x - 0.2, w["ack_median"]),
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"R={w['R']}" for w in writes])
        ax.set_yscale("log")
        ax.set_ylabel("MB/s of unique data (log)")
        ax.set_title(f"replicated write, {results['params']['peers']} peers on loopback")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / PLOTS["throughput"]))
    rep = series.get("repair")
    if rep and rep.get("timeline"):
        fig, ax = plt.subplots(figsize=(7, 4))
        t = [p[0] for p in rep["timeline"]]
        ax.step(t, [p[1] for p in rep["timeline"]], where="post", color="C3",
                label="under-replicated chunks (survivors' status)")
        ax.set_xlabel("seconds after kill -9")
        ax.set_ylabel("under-replicated chunks")
        ax2 = ax.twinx()
        ax2.plot(t, [p[2] for p in rep["timeline"]], color="C0", label="copies held")
        ax2.axhline(rep["copies_total"], color="C0", ls=":", label="R copies of every chunk")
        ax2.set_ylabel("chunk copies on the survivors")
        for name, at in rep.get("events", {}).items():
            ax.axvline(at, color="grey", ls="--", lw=0.8)
            ax.annotate(name, (at, 0), rotation=90, va="bottom", ha="right", fontsize=8)
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="center right")
        ax.set_title("repair after kill -9 of a peer")
        fig.tight_layout()
        written.append(_save(fig, out / PLOTS["repair"]))
    lat = [f for f in results["figures"] if f["name"].startswith("propagation_")]
    if lat:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = range(len(lat))
        ax.bar([x - 0.2 for x in xs], [f["value"] for f in lat], 0.4,
               label="castore: close on A to listed on B")
        ax.bar([x + 0.2 for x in xs], [f["baseline"] for f in lat], 0.4,
               label="raw gRPC round trip (baseline)")
        for x, f in zip(xs, lat):
            ax.annotate(f"{f['value']:.0f} ms", (x - 0.2, f["value"]), ha="center",
                        va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f["name"].split("_")[1] for f in lat])
        ax.set_yscale("log")
        ax.set_ylabel("milliseconds (log)")
        ax.set_title("propagation latency between two peers' drives")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(_save(fig, out / PLOTS["latency"]))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- report.md ----------------------------------------------------------------------------
def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def markdown(results: dict[str, Any]) -> str:
    p, m = results["params"], results["machine"]
    lines = [
        "# castore bench", "",
        f"castore {results.get('castore_version', '?')}, {m.get('time', '')}, "
        f"{m.get('cpus')} CPUs, Linux {m.get('kernel')}, Python {m.get('python')}; "
        f"{p['peers']} peers on loopback, R = {p['redundancy']}, {p['size_mib']} MiB per run, "
        f"median of {p['runs']} run(s); the whole run took {results.get('seconds', 0):.0f} s.",
        "",
        "Every figure sits beside a baseline measured in the same run on the same machine. "
        "Read the ratio first: it cancels most of the machine's noise (disk and CPU load move "
        "both sides alike), while the absolute figures can swing by tens of percent between "
        "runs.", "",
        "| figure | castore | baseline | ratio | better |",
        "|---|---:|---:|---:|---|",
    ]
    for f in results["figures"]:
        lines.append(f"| {f['title']} | {_num(f['value'])} {f['unit']} | "
                     f"{_num(f['baseline'])} {f['unit']} ({f['baseline_label']}) | "
                     f"{f['ratio']:.3g}x | {f['better']} |")
    lines += ["", "Notes:", ""]
    lines += [f"- **{f['name']}**: {f['note']}" for f in results["figures"] if f.get("note")]
    sections = [("throughput", "Replicated write per R",
                 "MB/s of unique data at each redundancy R, against one raw gRPC client stream "
                 "of 1 MiB messages on loopback (no TLS, no storage)."),
                ("repair", "Repair after kill -9",
                 "Under-replicated chunks (from the survivors' status, the counts "
                 "`castore status --json` shows; they change at each repair pass) and chunk "
                 "copies held by the survivors, from the kill until every chunk has R copies "
                 "again. The marks: dead (detected), out (down-out interval over: repair "
                 "starts), done."),
                ("latency", "Propagation latency",
                 "From close() of a new file on peer A's drive to its name in a listing of "
                 "peer B's drive, against a raw gRPC round trip on loopback.")]
    for key, title, text in sections:
        lines += ["", f"## {title}", "", text, "", f"![{title}]({PLOTS[key]})"]
    env = ", ".join(f"{k}={v}" for k, v in results.get("cluster_env", {}).items())
    lines += ["", "## Setup", "",
              f"Peers are real `castore daemon` processes on 127.0.0.1, started by the bench "
              f"with `--down-out-interval {p['down_out']}` and {env}. Data is incompressible "
              f"(random), a new file per run, so nothing deduplicates.", ""]
    return "\n".join(lines)


# -- compare ------------------------------------------------------------------------------
def _pct(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.1f}%" if a else "n/a"


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Per figure in either file: A, B, the change in percent and the ratio-to-baseline
    change. Returns (rows, the table as text)."""
    fa = {f["name"]: f for f in a["figures"]}
    fb = {f["name"]: f for f in b["figures"]}
    names = list(fa) + [n for n in fb if n not in fa]
    rows = []
    for n in names:
        x, y = fa.get(n), fb.get(n)
        row: dict[str, Any] = {"figure": n, "unit": (x or y or {}).get("unit", "")}
        if x and y:
            ra = x.get("ratio") or (x["value"] / x["baseline"] if x["baseline"] else 0.0)
            rb = y.get("ratio") or (y["value"] / y["baseline"] if y["baseline"] else 0.0)
            row.update(a=x["value"], b=y["value"], change=_pct(x["value"], y["value"]),
                       ratio_a=ra, ratio_b=rb, ratio_change=_pct(ra, rb),
                       better=x.get("better", "higher"))
        else:
            row.update(a=x["value"] if x else None, b=y["value"] if y else None,
                       change="only in A" if x else "only in B")
        rows.append(row)
    head = f"{'FIGURE':<22} {'UNIT':<8} {'A':>10} {'B':>10} {'CHANGE':>9}  " \
           f"{'RATIO A':>8} {'RATIO B':>8} {'CHANGE':>9}"
    out = [head]
    for r in rows:
        a_s = _num(r["a"]) if r["a"] is not None else "-"
        b_s = _num(r["b"]) if r["b"] is not None else "-"
        if "ratio_a" in r:
            tail = f"{r['ratio_a']:>7.3g}x {r['ratio_b']:>7.3g}x {r['ratio_change']:>9}"
        else:
            tail = ""
        out.append(f"{r['figure']:<22} {r['unit']:<8} {a_s:>10} {b_s:>10} "
                   f"{r['change']:>9}  {tail}".rstrip())
    return rows, "\n".join(out)
