"""castore bench as a user runs it: a real `castore bench` subprocess on a small cluster it
starts itself, the files it writes, --compare, and cleanup (every process and mount it started
is gone afterwards, also after SIGINT or SIGTERM in the middle of a run). Processes are found
by PID through /proc, mounts through /proc/mounts; nothing is killed by name."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from castore import mounts

CASTORE = [str(Path(sys.executable).parent / "castore")]
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = {"ingest", "write_r1_ack", "write_r1_placed", "write_r2_ack", "write_r2_placed",
           "write_r3_ack", "write_r3_placed", "mount_read", "propagation_p50",
           "propagation_p90", "propagation_p99", "small_files", "join_moved",
           "repair_transfer", "repair_total"}
QUICK = ["bench", "--quick", "--size-mib", "2", "--samples", "20", "--small-files", "100"]


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CASTORE_")}


def pids_mentioning(path: Path) -> list[int]:
    """PIDs of live processes whose command line names path (the bench's daemons do)."""
    needle = str(path).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry))
    return found


def mounts_under(path: Path) -> list[str]:
    return [m.mountpoint for m in mounts.fuse_mounts() if m.mountpoint.startswith(str(path))]


def assert_clean(path: Path) -> None:
    deadline = time.monotonic() + 10
    while (pids_mentioning(path) or mounts_under(path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pids_mentioning(path) == [], "castore processes left behind"
    assert mounts_under(path) == [], "mounts left behind"


def bench(*args: str, timeout: float = 60.0,
          extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CASTORE + list(args), capture_output=True, text=True,
                          env={**env(), **(extra_env or {})}, timeout=timeout)


@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_the_suite_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = bench(*QUICK, "--out", str(out), timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1/" in proc.stderr and "report" in proc.stderr
    results = json.loads((out / "results.json").read_text())
    figures = {f["name"]: f for f in results["figures"]}
    assert set(figures) == FIGURES
    for f in figures.values():
        assert isinstance(f["value"], (int, float)) and f["value"] >= 0, f
        assert isinstance(f["baseline"], (int, float)) and f["baseline"] > 0, f
        assert f["baseline_label"], f
        assert f["ratio"] == pytest.approx(f["value"] / f["baseline"], rel=1e-3, abs=1e-4)
    for name in ("ingest", "mount_read", "small_files", "write_r2_ack"):
        assert figures[name]["value"] > 0
    timeline = results["series"]["repair"]["timeline"]
    assert timeline
    assert set(results["series"]["repair"]["events"]) == {"dead", "out", "started", "done"}
    report = (out / "report.md").read_text()
    for png in ("throughput.png", "repair.png", "latency.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, png
        assert f"]({png})" in report
    assert "| castore add (offline) vs BLAKE3 alone |" in report
    assert not (out / "work").exists(), "the peers' homes should be removed"
    assert_clean(tmp_path)


class _Drain:
    """Collects a pipe's lines in a thread, so the child never blocks on a full pipe."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._t.start()

    def _run(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.fuse
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_stops_every_process_and_mount(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(CASTORE + QUICK + ["--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env())
    drain = _Drain(proc.stderr)
    try:
        deadline = time.monotonic() + 180
        while not (mounts_under(out) and len(pids_mentioning(out)) >= 3):
            assert proc.poll() is None, drain.text()
            assert time.monotonic() < deadline, "the mounted cluster never came up:\n" + \
                drain.text()
            time.sleep(0.2)
        assert pids_mentioning(out), "expected running daemons before the signal"
        proc.send_signal(sig)
        rc = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert rc == 130, drain.text()
    assert "interrupted" in drain.text()
    assert "Traceback" not in drain.text()
    assert_clean(tmp_path)
    assert not (out / "work").exists(), drain.text()


def _result(values: dict[str, float]) -> dict[str, Any]:
    figs = [{"name": n, "title": n, "unit": "MB/s", "value": v, "baseline": 100.0,
             "baseline_label": "raw", "better": "higher", "ratio": v / 100.0, "runs": [v],
             "baseline_runs": [100.0], "note": ""} for n, v in values.items()]
    return {"format": 1, "params": {}, "machine": {}, "figures": figs, "series": {}}


def test_compare_prints_change_and_ratio_change(tmp_path: Path) -> None:
    a = _result({"write_r2_ack": 50.0, "mount_read": 200.0, "ingest": 80.0})
    b = copy.deepcopy(a)
    b["figures"][0]["value"] = 55.0                # +10 %, and its baseline moves too:
    b["figures"][0]["baseline"] = 110.0            # the ratio stays 0.5
    b["figures"][0]["ratio"] = 0.5
    b["figures"][1]["value"] = 150.0
    b["figures"][1]["ratio"] = 1.5
    del b["figures"][2]
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    proc = bench("bench", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[3:]}
    assert "+10.0%" in rows["write_r2_ack"] and "+0.0%" in rows["write_r2_ack"]
    assert "-25.0%" in rows["mount_read"]
    assert "only in A" in rows["ingest"]
    js = bench("bench", "--json", "--compare", str(tmp_path / "a.json"),
               str(tmp_path / "b.json"))
    assert js.returncode == 0
    row = {r["figure"]: r for r in json.loads(js.stdout)["figures"]}["mount_read"]
    assert row["change"] == "-25.0%" and row["ratio_change"] == "-25.0%"


@pytest.mark.parametrize("content, message", [
    (None, "no such file"), ("{not json", "not JSON"),
    ('{"figures": 3}', "not a castore bench result")])
def test_compare_rejects_missing_or_invalid_files(tmp_path: Path, content: str | None,
                                                  message: str) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_result({"ingest": 1.0})))
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    proc = bench("bench", "--compare", str(good), str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(bad) in lines[0], proc.stderr


def test_without_matplotlib_it_says_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoMatplotlib:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _NoMatplotlib())\n")
    proc = bench("bench", "--quick", "--out", str(tmp_path / "out"),
                 extra_env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "castore[bench]" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_impossible_parameters_are_a_usage_error(tmp_path: Path) -> None:
    proc = bench("bench", "--redundancy", "1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--redundancy" in proc.stderr


def test_the_scratch_space_goes_even_when_a_late_process_writes_into_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process stopped by an interrupt may still close a file in the scratch space while it
    is removed: the removal goes on until it is gone, or says what is left."""
    import io
    import shutil
    from castore.benchsuite import suite
    from castore.benchsuite.progress import Steps
    work = tmp_path / "work"
    real = shutil.rmtree
    calls: list[int] = []

    def late_writer(path: Path, ignore_errors: bool = False) -> None:
        real(path, ignore_errors=ignore_errors)
        calls.append(1)
        if len(calls) == 1:                    # a file closed just after the first pass
            (work / "peer").mkdir(parents=True)
            (work / "peer" / "daemon.json").write_text("{}")
    monkeypatch.setattr(suite.shutil, "rmtree", late_writer)
    (work / "peer").mkdir(parents=True)
    err = io.StringIO()
    suite._remove(work, Steps(1, err, live=False), timeout=5.0)
    assert not work.exists() and len(calls) == 2 and err.getvalue() == ""
    monkeypatch.setattr(suite.shutil, "rmtree", lambda path, ignore_errors=False: None)
    (work / "peer").mkdir(parents=True)
    suite._remove(work, Steps(1, err, live=False), timeout=0.3)
    assert "could not remove" in err.getvalue() and "peer" in err.getvalue()
