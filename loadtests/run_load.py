"""Run a Locust scenario headless, against a running engine or one started for the run.

    python loadtests/run_load.py --scenario fcfs|draw [--users 60] [--time 60s]
        [--host URL --admin-token=TOKEN --difficulty BITS] [--database-url DSN]

Without --host it starts `python -m engine serve` on a free loopback port, with the
settings a load test needs (X-Forwarded-For believed from 127.0.0.1, a low proof-of-work
difficulty so that the load generator's own CPU is not the bottleneck), and stops it after.
With --host, the engine must trust X-Forwarded-For from this machine, --difficulty must be
its GUICHET_POW_DIFFICULTY (low, for the same reason) and --database-url its database.
Reports go to loadtests/reports/: Locust's CSV and HTML, and SCENARIO-summary.json. Exits
with Locust's code: non-zero when a slot was overbooked, a booking answered confirmed is
not in the database (confirmed), the release is not in the database, a spent challenge
was granted a hold, the draw never came, or any request failed (answered other than the
scenario provokes: a 400, 401, 403, 404, 500, a dropped connection).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"run_load: the engine at {url} did not come up")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", choices=["fcfs", "draw"], default="fcfs")
    parser.add_argument("--users", type=int, default=60)
    parser.add_argument("--spawn-rate", type=int, default=20)
    parser.add_argument("--time", default="60s")
    parser.add_argument("--places", type=int, default=40)
    parser.add_argument("--host", help="a running engine (default: start one)")
    parser.add_argument("--admin-token", default=os.environ.get("GUICHET_ADMIN_TOKEN", ""))
    parser.add_argument(
        "--difficulty", type=int, default=10, help="the engine's base difficulty, in bits"
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("GUICHET_DATABASE_URL", "postgresql://postgres@127.0.0.1/guichet"),
        help="the engine's PostgreSQL, checked after the run",
    )
    parser.add_argument("--reports", default=str(ROOT / "loadtests" / "reports"))
    args = parser.parse_args()
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    engine = None
    host, token = args.host, args.admin_token
    if host is None:
        port, token = free_port(), secrets.token_urlsafe(24)
        env = {
            **os.environ,
            "GUICHET_PORT": str(port),
            "GUICHET_ADMIN_TOKEN": token,
            "GUICHET_TRUSTED_PROXIES": "127.0.0.1",
            "GUICHET_DATABASE_URL": args.database_url,
            "GUICHET_POW_DIFFICULTY": str(args.difficulty),
            "GUICHET_POW_PUZZLES": "2",
        }
        log = open(reports / f"{args.scenario}-engine.log", "w")  # noqa: SIM115
        # As `make run` does: an engine on a schema behind its own is not ready.
        subprocess.check_call(
            [sys.executable, "-m", "engine", "migrate"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
        engine = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve"], env=env, stdout=log, stderr=log, cwd=ROOT
        )
        host = f"http://127.0.0.1:{port}"
        wait_ready(host)
    try:
        prefix = reports / args.scenario
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(ROOT / "loadtests" / "locustfile.py"),
                "--headless",
                "--only-summary",
                "-u",
                str(args.users),
                "-r",
                str(args.spawn_rate),
                "-t",
                args.time,
                "--host",
                host,
                "--scenario",
                args.scenario,
                f"--admin-token={token}",  # a token may begin with "-"
                "--places",
                str(args.places),
                "--database-url",
                args.database_url,
                "--pow-difficulty",
                str(args.difficulty),
                "--csv",
                str(prefix),
                "--html",
                f"{prefix}.html",
                "--summary",
                f"{prefix}-summary.json",
            ],
            cwd=ROOT,
        )
    finally:
        if engine is not None:
            engine.terminate()
            try:
                engine.wait(timeout=20)
            except subprocess.TimeoutExpired:
                engine.kill()


if __name__ == "__main__":
    sys.exit(main())
