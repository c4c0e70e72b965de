"""Scale simulation of castore placement: balance, data moved by a join or a leave, durability.

    python bench/sim.py [--seed 1] [--peers 10,100,1000,10000] [--redundancy 3] [--afr 0.02]
                        [--repair-hours 1] [--out bench/results] [--workers 2]

Every placement decision is the real castore.placement code: a PlacementTable (which the tests
check equal to placement.holders() on every PG) per peer set, with_peer / without_peer for the
events. numpy only does the bookkeeping: sums over PGs and peers, the chunk population.

Per N (peers), with the recommended PG count (P·R/N >= 100) and R copies:
  - balance: max/mean load in PGs and in bytes; equal weights, and mixed capacities (1, 2, 4 or
    8 units, where the load is the fill ratio load/weight);
  - a join (8 events) and a leave (8 events): copies and bytes moved against the minimum. A
    join must at least give the newcomer its fair share, R·P·w/W; a leave must re-create what
    the leaver held. Also reported: copies that moved between old peers (collateral, 0 for HRW);
  - durability: P(a given chunk is lost in a year) and P(any chunk is lost in a year), from the
    birth-death chain of a PG's copy count (failure rate k·λ with k copies up, repair (R-k)·μ,
    λ from the AFR, μ = 1/repair time), times the number of distinct holder sets (the copyset
    effect); checked by a seeded Monte Carlo at small N and a high failure rate.
Writes DIR/sim.json, DIR/sim_balance.png, DIR/sim_moved.png and DIR/sim_durability.png, and
prints one JSON line per figure. Results depend only on the arguments and the seed.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine  # noqa: E402

from castore.ids import PeerId  # noqa: E402
from castore.placement import PeerInfo, PlacementTable, recommended_pg_bits  # noqa: E402

HOURS_PER_YEAR = 8766.0
CAPACITIES = (1.0, 2.0, 4.0, 8.0)       # mixed weights: capacities in arbitrary units
EVENTS = 8                              # joins and leaves per configuration
CHUNKS_PER_PG = 100                     # mean chunks per PG, Poisson
CHUNK_MIB, CHUNK_SHAPE = 1.0, 4.0       # chunk sizes: gamma, mean 1 MiB, cv 0.5 (CDC-like)


# -- one configuration: N peers, equal or mixed weights ----------------------------------

def make_peers(n: int, seed: int, mixed: bool, tag: str = "peer") -> list[PeerInfo]:
    """n peers with ids derived from (seed, tag, i); mixed: capacities drawn from CAPACITIES."""
    rnd = random.Random(f"{seed}/{tag}/{n}/{mixed}")
    return [PeerInfo(PeerId.of(f"sim {seed} {tag} {i}".encode()),
                     rnd.choice(CAPACITIES) if mixed else 1.0) for i in range(n)]


def pg_bytes(bits: int, seed: int) -> np.ndarray:
    """Bytes (MiB) in each PG: Poisson(CHUNKS_PER_PG) chunks of gamma-distributed sizes."""
    rng = np.random.default_rng([seed, bits])
    counts = rng.poisson(CHUNKS_PER_PG, 1 << bits)
    sizes = np.zeros(counts.shape)
    some = counts > 0
    sizes[some] = rng.gamma(counts[some] * CHUNK_SHAPE, CHUNK_MIB / CHUNK_SHAPE)
    return sizes


def _matrix(table: PlacementTable) -> tuple[np.ndarray, dict[PeerId, int]]:
    """The holders of every PG as peer indices, shape (P, R_eff)."""
    index = {p.id: i for i, p in enumerate(table.peers)}
    return np.array(table.holder_indices(), dtype=np.int64), index


def _balance(loads: np.ndarray, weights: np.ndarray) -> float:
    fill = loads / weights
    return float(fill.max() / fill.mean())


def simulate(n: int, r: int, seed: int, mixed: bool) -> dict[str, Any]:
    """Balance, joins and leaves for n peers. Pure function of its arguments."""
    t0 = time.perf_counter()
    bits = recommended_pg_bits(n, r)
    peers = make_peers(n, seed, mixed)
    table = PlacementTable.build(peers, r, bits=bits)
    build_s = time.perf_counter() - t0
    held, index = _matrix(table)
    weights = np.array([p.weight for p in table.peers])
    mib = pg_bytes(bits, seed)
    pg_load = np.bincount(held.ravel(), minlength=n)
    byte_load = np.bincount(held.ravel(), weights=np.repeat(mib, table.r_eff), minlength=n)
    out: dict[str, Any] = {
        "peers": n, "mixed": mixed, "pg_bits": bits, "pgs": 1 << bits, "r_eff": table.r_eff,
        "pgs_per_peer": (1 << bits) * table.r_eff / n,
        "balance_pgs": _balance(pg_load, weights), "balance_bytes": _balance(byte_load, weights),
        "distinct_holder_sets": int(np.unique(np.sort(held, axis=1), axis=0).shape[0]),
    }
    rnd = random.Random(f"{seed}/events/{n}/{mixed}")
    total_mib = float(mib.sum())
    joins, leaves = [], []
    t1 = time.perf_counter()
    for new in make_peers(EVENTS, seed, mixed, tag=f"joiner{n}"):
        grown = table.with_peer(new)
        changed = table.changed(grown)
        collateral = sum(len(set(grown.holders(pg)) - set(table.holders(pg)) - {new.id})
                         for pg in changed)
        share = new.weight / (weights.sum() + new.weight)
        r_new = min(r, n + 1)
        joins.append({"copies": len(changed), "collateral": collateral,
                      "over_min": len(changed) / (r_new * (1 << bits) * share),
                      "bytes_over_min": float(mib[changed].sum()) / (r_new * total_mib * share)})
    for _ in range(EVENTS):
        gone = table.peers[rnd.randrange(n)]
        shrunk = table.without_peer(gone.id)
        changed = shrunk.changed(table)
        was_held = (held == index[gone.id]).any(axis=1)
        collateral = sum(len(set(shrunk.holders(pg)) - set(table.holders(pg))) - 1
                         for pg in changed)
        share = gone.weight / weights.sum()
        leaves.append({"copies": len(changed), "held": int(was_held.sum()),
                       "collateral": collateral,
                       "over_min": len(changed) / max(1, int(was_held.sum())),
                       "over_fair_share": len(changed) / (table.r_eff * (1 << bits) * share),
                       "bytes_over_min": float(mib[changed].sum()) /
                       max(1e-9, float(mib[was_held].sum()))})
    out["join"] = _summary(joins)
    out["leave"] = _summary(leaves)
    out["seconds"] = {"build": round(build_s, 2), "events": round(time.perf_counter() - t1, 2)}
    return out


def _summary(events: list[dict[str, float]]) -> dict[str, Any]:
    keys = [k for k in events[0] if k.endswith("min") or k.endswith("share")]
    s: dict[str, Any] = {f"{k}_mean": float(np.mean([e[k] for e in events])) for k in keys}
    s.update({f"{k}_max": float(np.max([e[k] for e in events])) for k in keys})
    s["collateral"] = int(sum(e["collateral"] for e in events))
    s["events"] = len(events)
    return s


# -- durability ----------------------------------------------------------------------------

def mttdl_hours(r: int, fail_per_hour: float, repair_hours: float) -> float:
    """Mean time until a PG with r copies loses its last one: a birth-death chain on the number
    of copies up, k -> k-1 at k·λ, k -> k+1 at (r-k)·μ (missing copies are rebuilt in
    parallel), from k = r to the absorbing k = 0."""
    lam, mu = fail_per_hour, 1.0 / repair_hours
    # tau_k = expected time to first go from k copies to k-1: tau_k = (1 + up_k·tau_{k+1})/down_k,
    # all terms positive, so no cancellation (a linear solve is singular at λ/μ ~ 1e-6)
    tau, total = 0.0, 0.0
    for k in range(r, 0, -1):
        tau = (1.0 + (r - k) * mu * tau) / (k * lam)
        total += tau
    return total


def durability(r: int, afr: float, repair_hours: float, holder_sets: int) -> dict[str, float]:
    """P(a given chunk is lost in a year) and P(any of holder_sets PGs' chunks is)."""
    lam = -math.log1p(-afr) / HOURS_PER_YEAR if afr < 1 else 1.0 / HOURS_PER_YEAR
    rate = HOURS_PER_YEAR / mttdl_hours(r, lam, repair_hours)     # losses per set-year
    return {"r": r, "chunk_loss_per_year": -math.expm1(-rate),
            "any_loss_per_year": -math.expm1(-rate * holder_sets), "holder_sets": holder_sets}


def expected_sets(n: int, r: int, pgs: int) -> int:
    """Distinct holder sets when pgs PGs pick uniform r-subsets of n peers (HRW's limit)."""
    r = min(r, n)
    c = math.comb(n, r)
    return round(c * -math.expm1(pgs * math.log1p(-1 / c))) if c > 1 else 1


def monte_carlo(n: int, r: int, fail_per_year: float, repair_hours: float, years: float,
                seed: int) -> dict[str, Any]:
    """Seeded check of the chain: peers alternate up (Exp(λ)) and down (Exp(μ)); count the
    times a real holder set (PlacementTable, recommended PGs) has all its copies down."""
    bits = recommended_pg_bits(n, r)
    table = PlacementTable.build(make_peers(n, seed, False, tag="mc"), r, bits=bits)
    sets = {tuple(sorted(row)) for row in table.holder_indices()}
    by_peer: list[list[tuple[int, ...]]] = [[] for _ in range(n)]
    for s in sets:
        for i in s:
            by_peer[i].append(s)
    lam, mu = fail_per_year, HOURS_PER_YEAR / repair_hours
    rnd = random.Random(f"{seed}/mc/{n}/{r}")
    up = [True] * n
    events = [(rnd.expovariate(lam), i) for i in range(n)]
    heapq.heapify(events)
    losses = 0
    while events:
        t, i = heapq.heappop(events)
        if t > years:
            break
        if up[i]:
            up[i] = False
            losses += sum(all(not up[j] for j in s) for s in by_peer[i])
            heapq.heappush(events, (t + rnd.expovariate(mu), i))
        else:
            up[i] = True
            heapq.heappush(events, (t + rnd.expovariate(lam), i))
    measured = losses / (len(sets) * years)
    predicted = 1.0 / (mttdl_hours(r, lam / HOURS_PER_YEAR, repair_hours) / HOURS_PER_YEAR)
    return {"peers": n, "r": r, "holder_sets": len(sets), "years": years, "losses": losses,
            "afr_equiv": -math.expm1(-lam), "repair_hours": repair_hours,
            "loss_rate_per_set_year": measured, "chain_rate_per_set_year": predicted,
            "ratio": measured / predicted,
            "ratio_95ci": [max(0.0, losses - 1.96 * math.sqrt(losses)) / (predicted * len(sets)
                                                                        * years),
                           (losses + 1.96 * math.sqrt(losses)) / (predicted * len(sets) * years)]}


# -- the whole run -------------------------------------------------------------------------

def run(peers: list[int], r: int, afr: float, repair_hours: float, seed: int, workers: int = 1,
        mc_years: float = 2000.0) -> dict[str, Any]:
    """Everything but timing, plots and files: a pure function of its arguments."""
    tasks = sorted(((n, mixed) for n in peers for mixed in (False, True)), reverse=True)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = {t: pool.submit(simulate, t[0], r, seed, t[1]) for t in tasks}
            done = {t: f.result() for t, f in futures.items()}
    else:
        done = {t: simulate(t[0], r, seed, t[1]) for t in tasks}
    sizes = [done[(n, mixed)] for n in peers for mixed in (False, True)]
    dur = []
    for n in peers:
        sets_real = done[(n, False)]["distinct_holder_sets"]
        for rr in range(1, 6):
            pgs = 1 << recommended_pg_bits(n, rr)
            sets = sets_real if rr == r else expected_sets(n, rr, pgs)
            dur.append({"peers": n, "r_eff": min(rr, n), **durability(min(rr, n), afr,
                                                                      repair_hours, sets),
                        "sets_from": "table" if rr == r else "formula"})
    mc = [monte_carlo(12, rr, 1.0, 96.0, mc_years, seed) for rr in (2, 3)]
    return {"sizes": sizes, "durability": dur, "monte_carlo": mc, "afr": afr,
            "repair_hours": repair_hours}


def _strip_timing(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in sizes]


def plot(result: dict[str, Any], peers: list[int], r: int, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]

    def series(mixed: bool, key: str, sub: str | None = None) -> list[float]:
        rows = [s for s in sizes if s["mixed"] is mixed]
        return [s[sub][key] if sub else s[key] for s in rows]

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mixed, style in ((False, "-"), (True, "--")):
        label = "mixed weights (fill)" if mixed else "equal weights"
        ax.plot(peers, series(mixed, "balance_pgs"), "o" + style, label=f"PGs, {label}")
        ax.plot(peers, series(mixed, "balance_bytes"), "s" + style, label=f"bytes, {label}")
    ax.axhline(1.4, color="grey", lw=0.8, ls=":", label="target 1.4")
    ax.set(xscale="log", xlabel="peers", ylabel="max / mean load",
           title=f"Placement balance (R={r}, P·R/N ≥ 100)")
    ax.legend(fontsize=8)
    paths.append(out / "sim_balance.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mixed, style in ((False, "-"), (True, "--")):
        tag = "mixed" if mixed else "equal"
        ax.plot(peers, series(mixed, "over_min_mean", "join"), "o" + style,
                label=f"join, mean of {EVENTS} ({tag})")
        ax.plot(peers, series(mixed, "over_min_max", "join"), "^" + style,
                label=f"join, worst ({tag})")
        ax.plot(peers, series(mixed, "over_min_mean", "leave"), "s" + style,
                label=f"leave, vs what it held ({tag})")
    ax.axhline(1.1, color="grey", lw=0.8, ls=":", label="target 1.1")
    ax.set(xscale="log", xlabel="peers", ylabel="copies moved / minimum",
           title="Data moved by one join or leave")
    ax.legend(fontsize=8)
    paths.append(out / "sim_moved.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dur = result["durability"]
    rs = sorted({d["r"] for d in dur if d["peers"] == peers[-1]})
    big = [d for d in dur if d["peers"] == peers[-1]]
    ax.plot(rs, [d["chunk_loss_per_year"] for d in big], "k-o", label="a given chunk")
    for n in peers:
        rows = [d for d in dur if d["peers"] == n]
        ax.plot([d["r"] for d in rows], [max(d["any_loss_per_year"], 1e-300) for d in rows],
                "--s", label=f"any chunk, {n} peers")
    ax.set(yscale="log", xlabel="copies R", ylabel="P(loss) per year", xticks=rs,
           title=f"Durability (AFR {result['afr']:.0%}, repair {result['repair_hours']:g} h)")
    ax.legend(fontsize=8)
    paths.append(out / "sim_durability.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--peers", default="10,100,1000,10000",
                    help="comma-separated peer counts")
    ap.add_argument("--redundancy", type=int, default=3)
    ap.add_argument("--afr", type=float, default=0.02, help="annual failure rate per peer")
    ap.add_argument("--repair-hours", type=float, default=1.0,
                    help="time to re-create a lost copy (detection + transfer)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--mc-years", type=float, default=2000.0)
    args = ap.parse_args(argv)
    peers = sorted(int(x) for x in args.peers.split(","))
    wall0, cpu0 = time.perf_counter(), os.times()
    print(json.dumps({"seed": args.seed, "peers": peers, "redundancy": args.redundancy,
                      "afr": args.afr, "repair_hours": args.repair_hours,
                      "workers": args.workers}), flush=True)
    result = run(peers, args.redundancy, args.afr, args.repair_hours, args.seed, args.workers,
                 args.mc_years)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = plot(result, peers, args.redundancy, args.out)
    cpu1 = os.times()
    timing = {"wall_s": round(time.perf_counter() - wall0, 1),
              "cpu_s": round(cpu1.user + cpu1.system + cpu1.children_user + cpu1.children_system
                             - cpu0.user - cpu0.system - cpu0.children_user
                             - cpu0.children_system, 1),
              "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
              "per_size": {f"{s['peers']}{'m' if s['mixed'] else 'e'}": s["seconds"]
                           for s in result["sizes"]}}
    doc = {"config": {"seed": args.seed, "peers": peers, "redundancy": args.redundancy,
                      "afr": args.afr, "repair_hours": args.repair_hours,
                      "events": EVENTS, "capacities": CAPACITIES,
                      "chunks_per_pg": CHUNKS_PER_PG, "chunk_mib": CHUNK_MIB},
           "results": {**result, "sizes": _strip_timing(result["sizes"])},
           "timing": timing, "machine": machine(), "plots": [p.name for p in paths]}
    (args.out / "sim.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    emit(figure="balance", redundancy=args.redundancy, **{
        f"{s['peers']}_{'mixed' if s['mixed'] else 'equal'}":
            {"pgs": round(s["balance_pgs"], 3), "bytes": round(s["balance_bytes"], 3)}
        for s in result["sizes"]})
    emit(figure="moved_over_min", **{
        f"{s['peers']}_{'mixed' if s['mixed'] else 'equal'}":
            {"join_mean": round(s["join"]["over_min_mean"], 3),
             "join_max": round(s["join"]["over_min_max"], 3),
             "leave_mean": round(s["leave"]["over_min_mean"], 3),
             "leave_vs_fair_share": round(s["leave"]["over_fair_share_mean"], 3),
             "collateral": s["join"]["collateral"] + s["leave"]["collateral"]}
        for s in result["sizes"]})
    emit(figure="durability", afr=args.afr, repair_hours=args.repair_hours, **{
        f"{d['peers']}_r{d['r']}": {"chunk": float(f"{d['chunk_loss_per_year']:.3g}"),
                                   "any": float(f"{d['any_loss_per_year']:.3g}")}
        for d in result["durability"]},
        monte_carlo=[{k: (round(v, 3) if isinstance(v, float) else v) for k, v in m.items()
                      if k in ("r", "losses", "ratio")} for m in result["monte_carlo"]])
    emit(figure="timing", **timing)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
