"""bench/sim.py at small N: seeded runs repeat exactly; the balance and join-movement targets
hold at the recommended PG count; the durability model matches its closed forms."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SIM_PATH = Path(__file__).resolve().parent.parent / "bench" / "sim.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("castore_bench_sim", SIM_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def result(sim: ModuleType) -> dict[str, Any]:
    out: dict[str, Any] = sim.run([10, 100], 3, 0.02, 1.0, seed=7, workers=1, mc_years=300)
    return out


def _size(result: dict[str, Any], n: int, mixed: bool) -> dict[str, Any]:
    return next(s for s in result["sizes"] if s["peers"] == n and s["mixed"] is mixed)


def test_a_seeded_run_repeats_exactly(sim: ModuleType, result: dict[str, Any]) -> None:
    again = sim.run([10, 100], 3, 0.02, 1.0, seed=7, workers=1, mc_years=300)
    assert sim._strip_timing(again["sizes"]) == sim._strip_timing(result["sizes"])
    assert again["durability"] == result["durability"]
    assert again["monte_carlo"] == result["monte_carlo"]
    other = sim.run([10], 3, 0.02, 1.0, seed=8, workers=1, mc_years=10)
    assert _size(other, 10, False)["balance_pgs"] != _size(result, 10, False)["balance_pgs"]


def test_balance_at_the_recommended_pg_count(result: dict[str, Any]) -> None:
    for mixed in (False, True):
        s = _size(result, 100, mixed)
        assert s["pgs"] == 4096 and s["pgs_per_peer"] >= 100
        assert s["balance_pgs"] <= 1.4 and s["balance_bytes"] <= 1.4, s


def test_joins_and_leaves_move_about_the_minimum(result: dict[str, Any]) -> None:
    for n in (10, 100):
        s = _size(result, n, False)
        assert s["join"]["collateral"] == 0 and s["leave"]["collateral"] == 0
        assert 0.9 <= s["join"]["over_min_mean"] <= 1.1, s["join"]
        assert s["join"]["over_min_max"] <= 1.25, s["join"]
        assert s["leave"]["over_min_mean"] == s["leave"]["over_min_max"] == 1.0


def test_the_chain_matches_closed_forms(sim: ModuleType) -> None:
    lam, repair = 1e-4, 2.0
    mu = 1 / repair
    assert math.isclose(sim.mttdl_hours(1, lam, repair), 1 / lam)
    assert math.isclose(sim.mttdl_hours(2, lam, repair), (3 * lam + mu) / (2 * lam ** 2))
    chunk = [sim.durability(r, 0.02, 1.0, 1000)["chunk_loss_per_year"] for r in range(1, 6)]
    assert chunk[0] == pytest.approx(0.02) and all(a > b for a, b in zip(chunk, chunk[1:]))
    assert sim.expected_sets(10, 3, 512) <= math.comb(10, 3)
    assert sim.expected_sets(10_000, 3, 1 << 19) == pytest.approx(1 << 19, rel=1e-3)


def test_monte_carlo_agrees_with_the_chain(result: dict[str, Any]) -> None:
    two = next(m for m in result["monte_carlo"] if m["r"] == 2)
    assert two["losses"] > 200
    assert 0.75 <= two["ratio"] <= 1.25, two
