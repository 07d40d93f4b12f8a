"""The Locust scenarios, run briefly against a real engine, so they cannot rot: each user
class completes its flow and PostgreSQL holds no overbooked slot. Speed is not asserted
here (BENCHMARKS.md measures it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("scenario", ["fcfs", "draw"])
def test_scenario_runs_and_stays_consistent(scenario: str, database: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "loadtests" / "run_load.py"),
            "--scenario",
            scenario,
            "--users",
            "8",
            "--spawn-rate",
            "8",
            "--time",
            "8s",
            "--places",
            "10",
            "--reports",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
        env={**__import__("os").environ, "GUICHET_DATABASE_URL": database},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / f"{scenario}-summary.json").read_text())
    assert summary["overbooked_slots"] == 0
    assert summary["users"] == {"Person": 5, "Bot": 2, "Staff": 1}
    # A person's flow ends booked (or entered), refused, or finding nothing free.
    assert sum(n for k, n in summary["flows"].items() if k.startswith("Person")) > 0
    if scenario == "draw":
        assert summary["flows"].get("Person", 0) > 0, summary["flows"]
    assert summary["flows"].get("Bot", 0) > 0 and summary["flows"].get("Staff", 0) > 0
    assert 0 < summary["fairness"]["places_won"] <= 10 + 5  # its places, and staff's
    if scenario == "draw":
        assert summary["fairness"]["draw_entries"] > 0
    names = {r["name"] for r in summary["requests"]}
    assert "/v1/challenges" in names and (tmp_path / f"{scenario}.html").exists()
