"""The CI's smoke of bench/night.py: two tiny nights (2 and 4 small studies) through ``riskbridge run`` with the
floor measured beside them, on the sandbox. It checks that the benchmark runs end to end and reports what it must;
its figures measure nothing (benchmarks are not tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from riskbridge.settings import Settings
from riskbridge.stages import STAGE_NAMES

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench" / "night.py"


def test_night_benchmark_smoke_runs_both_sizes_and_reports_the_floor(sandbox: Settings, tmp_path: Path) -> None:
    out = tmp_path / "night"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCH.parents[1],  # the sandbox the settings name: the repository's
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "night.json").read_text())
    nights = {night["size"]: night for night in results["nights"]}
    assert sorted(nights) == [2, 4]
    for size, night in nights.items():
        assert night["arm"] == "riskbridge run"
        assert night["done"]["score"] == size and night["done"]["write_back"] == size, night
        assert set(night["stages"]) == set(STAGE_NAMES)
        floor = results["floors"][str(size)]
        assert all(seconds > 0 for seconds in floor.values()), floor
        assert {"files per series", "files per instance"} <= set(floor), floor
    report = (out / "night.md").read_text()
    assert "| 2 |" in report and "| 4 |" in report and "Overhead at N = 4" in report
    assert "What one file per instance costs the disk" in report
    assert (out / "night.png").stat().st_size > 10_000
