"""The Locust scenarios, run briefly against a real engine, so they cannot rot: each user
class completes its flow and PostgreSQL holds no overbooked slot. Speed is not asserted
here (BENCHMARKS.md measures it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
PLACES = 20  # room for the people: the bots book for 2 bots of 5 buyers at most


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
            "12s",
            "--places",
            str(PLACES),
            "--reports",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        # The tests' stores, not the developer's (make run's) Redis.
        env={**os.environ, "GUICHET_DATABASE_URL": database, "GUICHET_REDIS_URL": REDIS_URL},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((tmp_path / f"{scenario}-summary.json").read_text())
    assert summary["overbooked_slots"] == 0
    assert summary["users"] == {"Person": 5, "Bot": 2, "Staff": 1}
    # No call answered other than the scenario provokes (a broken request fails in Locust).
    assert not [r for r in summary["requests"] if r["failures"]], summary["requests"]
    flows = summary["flows"]
    # Every class completed its flow: people and bots booked (or entered the draw), staff
    # published, changed a release and read the agenda.
    assert flows.get("Person", 0) > 0 and flows.get("Bot", 0) > 0, flows
    assert flows.get("Staff", 0) > 0, flows
    assert not [k for k in flows if k.startswith("Person: cancel (")], flows
    fairness = summary["fairness"]
    outcomes = summary["outcomes"]
    if scenario == "fcfs":
        assert flows.get("Person: cancelled", 0) > 0, flows  # the first person booked cancels
        # Every booking a confirm was answered for (but those the scenario cancels) is
        # confirmed in PostgreSQL, which tells the bots' apart from the people's.
        assert summary["confirmed_answered"] > 0 and summary["confirmed_lost"] == 0
        assert fairness["places_won"] >= summary["confirmed_answered"]
        assert fairness["bot_places"] >= flows["Bot"] > 0, (fairness, flows)
        # A challenge the capacity decision spent, sent again for another slot: refused.
        assert set(outcomes["/v1/holds (replayed challenge)"]) == {"410"}, outcomes
    else:
        assert fairness["draw_entries"] == flows["Person"] + flows["Bot"]
    names = {r["name"] for r in summary["requests"]}
    assert "/v1/challenges" in names and (tmp_path / f"{scenario}.html").exists()
