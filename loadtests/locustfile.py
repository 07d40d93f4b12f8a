"""Locust scenarios: people, bots and staff against a running guichet engine.

    make load SCENARIO=fcfs            # or SCENARIO=draw; see README.md, "Load tests"

Run by hand:
    locust -f loadtests/locustfile.py --headless -u 60 -r 20 -t 60s --host http://127.0.0.1:8080 \
        --scenario fcfs --admin-token=TOKEN --database-url DSN --pow-difficulty 10 \
        --csv loadtests/reports/fcfs --html loadtests/reports/fcfs.html \
        --summary loadtests/reports/fcfs-summary.json

The engine must believe X-Forwarded-For from the load generator (GUICHET_TRUSTED_PROXIES=
127.0.0.1): people come from 10.N.0.0/16, spread over its /24s as homes and phones are;
bots rotate through 10.M.0.0/16, a new address for each attempt, as a proxy pool does.
The proof of work is solved in this process, in Python, between requests: run the engine
at a low difficulty (``run_load.py`` starts its own at 10 bits), or the load generator's own
CPU is what the numbers measure. ``--pow-difficulty`` is the engine's base difficulty: a
person takes ``--phone-seconds`` for a challenge at it, and twice as long per extra bit.

- fcfs: a first-come release opens once every user has started; everyone races for it.
- draw: a draw release takes entries during the run, closes just before the end, and is
  drawn by the engine; the summary waits for the record.

At the end the summary JSON has requests per second and p50/p95/p99 by endpoint, outcomes
by status, the flows each user class completed, and fairness: the share of places bots won
(their buyers' bookings, counted in PostgreSQL) against their share of the population.
PostgreSQL is checked for overbooked slots, and for every booking a confirm was answered
201 for (but those the run cancels): any slot overbooked or any such booking not confirmed
there makes the run fail (exit code 1), and so does a release that database does not have,
or a spent challenge granted a second hold. A call answered other than with a success or a
refusal the scenario provokes (409, 410, 429, 503) fails in Locust's reports.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, between, constant, events, task
from locust.env import Environment

from engine.pow import solve

SITE, PROCEDURE = "load", "storm"
# What people's and bots' calls may be answered: a success, or a refusal the scenario
# provokes (no place, not open, spent or expired, a limit, the engine shedding load).
# Anything else (400, 401, 403, 404, 500) fails the request in Locust's reports.
_ANSWERS = frozenset({200, 201, 204, 409, 410, 429, 503})


class Run:
    """What one run shares between users, and what it counts."""

    release: str = ""
    env: Environment | None = None
    users: Counter[str] = Counter()  # users started, by class
    buyers = 0
    # Identities and addresses differ from run to run: what a client did in an earlier run
    # (a booking, unspent challenges) must not follow it into this one.
    tag = f"{random.randrange(10**4):04d}"
    people_net = f"10.{1 + int(tag) % 60}"  # people: one /24 each in 10.N.0.0/16
    bot_net = f"10.{100 + int(tag) % 60}"  # bots: rotating through 10.M.0.0/16
    mode: str = "fcfs"
    started = 0.0
    outcomes: defaultdict[str, Counter[int]] = defaultdict(Counter)
    flows: Counter[str] = Counter()
    # The bookings a confirm was answered 201 for, and not cancelled since: each must be
    # confirmed in PostgreSQL at the end (no confirmed booking lost).
    confirmed: set[str] = set()
    people = itertools.count(1)
    bots = itertools.count(1)


RUN = Run()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--scenario", choices=["fcfs", "draw"], default="fcfs")
    parser.add_argument("--admin-token", default=os.environ.get("GUICHET_ADMIN_TOKEN", ""))
    parser.add_argument(
        "--database-url",
        default=os.environ.get("GUICHET_DATABASE_URL", "postgresql://postgres@127.0.0.1/guichet"),
    )
    parser.add_argument("--places", type=int, default=40, help="places in the release")
    parser.add_argument(
        "--phone-seconds",
        type=float,
        default=1.0,
        help="a phone's solve time at the base difficulty",
    )
    parser.add_argument(
        "--pow-difficulty",
        type=int,
        default=int(os.environ.get("GUICHET_POW_DIFFICULTY", "20")),
        help="the engine's base difficulty, which a phone solves in --phone-seconds",
    )
    parser.add_argument("--buyers", type=int, default=5, help="paying buyers per bot")
    parser.add_argument("--summary", default="loadtests/reports/summary.json")


def _admin(env: Environment, method: str, path: str, body: Any = None) -> Any:
    import urllib.request

    req = urllib.request.Request(
        env.host + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {env.parsed_options.admin_token}",
        },
    )
    with urllib.request.urlopen(req, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


@events.test_start.add_listener
def _publish(environment: Environment, **_: Any) -> None:
    """Publish the release the scenario is about (staff users publish more as they go)."""
    opts = environment.parsed_options
    RUN.mode, RUN.started, RUN.env = opts.scenario, time.time(), environment
    _admin(
        environment,
        "PUT",
        f"/v1/admin/sites/{SITE}",
        {
            "name": "Load test",
            "timezone": "Europe/Paris",
            "procedures": [{"id": PROCEDURE, "name": "Storm"}],
        },
    )
    now = datetime.now(UTC)
    first = now + timedelta(days=3)
    slots = [
        {
            "starts_at": (first + timedelta(minutes=15 * i)).isoformat(),
            "duration_minutes": 15,
            "capacity": 2,
        }
        for i in range(max(1, opts.places // 2))
    ]
    body: dict[str, Any] = {"site": SITE, "procedure": PROCEDURE, "mode": RUN.mode, "slots": slots}
    if RUN.mode == "fcfs":
        # Once every user has started (and browses, and asks for its challenge): a storm.
        spawning = (opts.num_users or 1) / (opts.spawn_rate or 1)
        body["opens_at"] = (now + timedelta(seconds=max(3.0, spawning + 1))).isoformat()
    else:
        run_time = opts.run_time or 60
        closes = now + timedelta(seconds=max(3, run_time - 3))
        body.update(
            registration_opens_at=(now - timedelta(seconds=1)).isoformat(),
            registration_closes_at=closes.isoformat(),
            draw_at=(closes + timedelta(seconds=1)).isoformat(),
        )
    RUN.release = _admin(environment, "POST", "/v1/admin/releases", body)["release"]["id"]


@events.request.add_listener
def _count(name: str, response: Any = None, **_: Any) -> None:
    if response is not None:
        RUN.outcomes[name][getattr(response, "status_code", 0) or 0] += 1


def applicant(n: int, kind: str) -> dict[str, str]:
    """A distinct identity per person and run; bots make them up by the hundred."""
    return {
        "family_name": f"{kind.title()}{n}",
        "given_names": "Load Test",
        "birth_date": "1990-01-01",
        "id_number": f"{'B' if kind == 'bot' else 'P'}{RUN.tag}{n:08d}",
        "email": f"{kind}{n}-{RUN.tag}@example.org",
    }


class Client(FastHttpUser):
    """What people and bots share: the API calls of a booking, one client address each."""

    abstract = True
    address = "127.0.0.1"

    def call(
        self,
        method: str,
        path: str,
        name: str,
        body: Any = None,
        token: str | None = None,
        address: str | None = None,
    ) -> tuple[int, Any]:
        headers = {"X-Forwarded-For": address or self.address}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        with self.client.request(
            method, path, name=name, json=body, headers=headers, catch_response=True
        ) as r:
            status = r.status_code
            data = r.json() if r.text else None
            if status in _ANSWERS:
                r.success()  # refusals are outcomes here, counted in the summary
            else:  # 400, 401, 403, 404, 500...: the scenario, or the engine, is broken
                r.failure(f"{status}: {data}")
            return status, data

    def free_slots(self) -> list[str]:
        status, body = self.call(
            "GET", f"/v1/releases/{RUN.release}/slots", "/v1/releases/[id]/slots"
        )
        return [s["id"] for s in body["slots"] if s["free"]] if status == 200 else []

    def challenge(self, address: str | None = None) -> tuple[int, dict[str, Any] | None]:
        status, body = self.call(
            "POST", "/v1/challenges", "/v1/challenges", {"release": RUN.release}, address=address
        )
        return status, body if status == 201 else None


class Person(Client):
    """A person on a cheap phone: browses, solves at a phone's pace, holds, thinks,
    confirms, sometimes cancels. Books once."""

    weight = 10
    wait_time = between(0.5, 2)

    def on_start(self) -> None:
        RUN.users["Person"] += 1
        self.n = next(RUN.people)
        self.address = f"{RUN.people_net}.{self.n & 255}.{1 + (self.n >> 8 & 127)}"
        self.done = False

    def solve_like_a_phone(self, c: dict[str, Any]) -> list[str]:
        nonces = solve(c["challenge"], c["difficulty"], c["puzzles"])
        opts = self.environment.parsed_options
        gevent.sleep(opts.phone_seconds * 2 ** (c["difficulty"] - opts.pow_difficulty))
        return nonces

    @task
    def book(self) -> None:
        if self.done:
            gevent.sleep(1)
            return
        self.call("GET", f"/v1/releases?site={SITE}", "/v1/releases")
        if RUN.mode == "draw":
            self.enter()
            return
        free = self.free_slots()
        if not free:
            RUN.flows["Person: nothing free"] += 1  # looks again later, as people do
            return
        status, c = self.challenge()
        if c is None:
            RUN.flows[f"Person: challenge refused ({status})"] += 1
            return
        nonces = self.solve_like_a_phone(c)
        paid = {"slot_id": random.choice(free), "challenge": c["challenge"], "nonces": nonces}
        status, hold = self.call("POST", "/v1/holds", "/v1/holds", paid)
        while status == 409 and (hold or {}).get("retry_after"):
            # Not open yet: the same paid request when it is, as the engine says (a new
            # challenge each time would soon meet the address's cap of unspent ones).
            gevent.sleep(hold["retry_after"])
            status, hold = self.call("POST", "/v1/holds", "/v1/holds", paid)
        if status != 201:
            RUN.flows[f"Person: hold refused ({status})"] += 1
            return
        gevent.sleep(random.uniform(1, 3))  # reads the slot, types a name
        status, booked = self.call(
            "POST",
            f"/v1/holds/{hold['hold_id']}/confirm",
            "/v1/holds/[id]/confirm",
            {"applicant": applicant(self.n, "person")},
            hold["hold_token"],
        )
        if status != 201:
            RUN.flows[f"Person: confirm refused ({status})"] += 1
            return
        RUN.flows["Person"] += 1
        ref = booked["booking"]["reference"]
        self.done = True
        if RUN.flows["Person"] % 5 != 1:
            RUN.confirmed.add(ref)
            return
        # One in five finds the time does not suit, and cancels: not checked in PostgreSQL,
        # confirmed or cancelled (the cancel's answer may be lost as the run stops).
        status, _ = self.call(
            "DELETE", f"/v1/bookings/{ref}", "/v1/bookings/[ref]", token=booked["cancel_token"]
        )
        RUN.flows["Person: cancelled" if status == 204 else f"Person: cancel ({status})"] += 1

    def enter(self) -> None:
        status, c = self.challenge()
        if c is None:
            RUN.flows[f"Person: challenge refused ({status})"] += 1
            if status == 409:  # registration closed: nothing left to enter
                self.done = True
            return
        nonces = self.solve_like_a_phone(c)
        status, _ = self.call(
            "POST",
            f"/v1/releases/{RUN.release}/entries",
            "/v1/releases/[id]/entries",
            {
                "challenge": c["challenge"],
                "nonces": nonces,
                "applicant": applicant(self.n, "person"),
            },
        )
        if status == 201:
            RUN.flows["Person"] += 1
            self.done = True
        else:
            RUN.flows[f"Person: entry refused ({status})"] += 1


class Bot(Client):
    """A reseller's bot: polls hard, solves natively at full speed, fires parallel holds,
    rotates addresses through the trusted proxy, books under many identities, and replays
    spent challenges on other slots."""

    weight = 3
    wait_time = constant(0.05)
    addresses = itertools.count(1)
    identities = itertools.count(1)

    def on_start(self) -> None:
        # A booking is only worth something in a buyer's name: each bot works for a few
        # paying buyers, and tries until each has a place (or an entry in the draw).
        RUN.users["Bot"] += 1
        opts = self.environment.parsed_options
        self.waiting = [applicant(next(Bot.identities), "bot") for _ in range(opts.buyers)]
        RUN.buyers += len(self.waiting)

    def rotate(self) -> str:
        """An address of the bot farm's proxy pool, anywhere in it: a pool's addresses are
        spread over many networks (in order, 256 attempts in a row shared one /24, and its
        network's bucket, which no real pool would)."""
        n = random.getrandbits(16)
        self.address = f"{RUN.bot_net}.{n >> 8}.{n & 255}"
        return self.address

    def attempt(self, slot: str, buyer: dict[str, str], other: str | None) -> None:
        """Hold ``slot`` and confirm it in ``buyer``'s name; replay the challenge on
        ``other``; hand back a hold that could not be confirmed (bots that sit on holds
        would only make every run a run of expired holds)."""
        address = self.rotate()  # parallel attempts: each keeps its own address
        _, c = self.challenge(address)
        if c is None:
            self.waiting.append(buyer)
            return
        paid = {
            "slot_id": slot,
            "challenge": c["challenge"],
            "nonces": solve(c["challenge"], c["difficulty"], c["puzzles"]),
        }
        status, hold = self.call("POST", "/v1/holds", "/v1/holds", paid, address=address)
        full = status == 409 and str((hold or {}).get("type")).endswith("/slot-full")
        if other is not None and (status == 201 or full):  # spent by the capacity decision
            replayed, again = self.call(
                "POST",
                "/v1/holds",
                "/v1/holds (replayed challenge)",
                {**paid, "slot_id": other},
                address=address,
            )
            if replayed == 201:  # a bug of the engine's: the summary fails the run
                RUN.flows["Bot: spent challenge granted"] += 1
                self.release(again, address)
        if status != 201:
            self.waiting.append(buyer)
            return
        booked, done = self.call(
            "POST",
            f"/v1/holds/{hold['hold_id']}/confirm",
            "/v1/holds/[id]/confirm",
            {"applicant": buyer},
            hold["hold_token"],
            address=address,
        )
        if booked == 201:
            RUN.flows["Bot"] += 1
            RUN.confirmed.add(done["booking"]["reference"])
            return
        self.release(hold, address)
        if booked != 409:  # identity-already-booked: that buyer has a place after all
            self.waiting.append(buyer)

    def release(self, hold: dict[str, Any], address: str) -> None:
        status, _ = self.call(
            "DELETE",
            f"/v1/holds/{hold['hold_id']}",
            "/v1/holds/[id]",
            token=hold["hold_token"],
            address=address,
        )
        RUN.flows["Bot: hold given back" if status == 204 else f"Bot: give back ({status})"] += 1

    def enter(self, buyer: dict[str, str]) -> None:
        address = self.rotate()
        status, c = self.challenge(address)
        if c is not None:
            nonces = solve(c["challenge"], c["difficulty"], c["puzzles"])
            status, _ = self.call(
                "POST",
                f"/v1/releases/{RUN.release}/entries",
                "/v1/releases/[id]/entries",
                {"challenge": c["challenge"], "nonces": nonces, "applicant": buyer},
                address=address,
            )
        if status == 201:
            RUN.flows["Bot"] += 1
        elif status != 409:  # 409: entered already, or registration closed (its challenge)
            self.waiting.append(buyer)

    @task
    def storm(self) -> None:
        self.call("GET", f"/v1/releases?site={SITE}", "/v1/releases")
        if RUN.mode == "draw":
            if self.waiting:
                self.enter(self.waiting.pop())
            return
        free = self.free_slots()  # polled hard, whether or not the bot still needs a place
        tries = [self.waiting.pop() for _ in range(min(4, len(free), len(self.waiting)))]
        if tries:
            pool = Pool(len(tries))
            slots = random.sample(free, len(tries))
            for i, (slot, buyer) in enumerate(zip(slots, tries, strict=True)):
                others = [s for s in free if s != slot]
                pool.spawn(self.attempt, slot, buyer, others[i % len(others)] if others else None)
            try:
                pool.join(timeout=30)
            finally:  # the bot stopped (the run's end): its attempts stop with it
                pool.kill()


class Staff(FastHttpUser):
    """Prefecture staff: publish small releases, read one back and add a place to it with
    the ETag read (If-Match), and read the day's agenda."""

    fixed_count = 1
    wait_time = between(2, 4)

    def on_start(self) -> None:
        RUN.users["Staff"] += 1

    def admin(
        self,
        method: str,
        path: str,
        name: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, str | None]:
        """The status, the JSON body (None if not JSON) and the ETag of an admin call."""
        auth = {"Authorization": f"Bearer {self.environment.parsed_options.admin_token}"}
        with self.client.request(
            method, path, name=name, json=body, headers={**auth, **(headers or {})}
        ) as r:
            json_body = r.json() if "json" in (r.headers.get("Content-Type") or "") else None
            return int(r.status_code), json_body, r.headers.get("ETag")

    @task
    def work(self) -> None:
        start = datetime.now(UTC) + timedelta(days=5)
        published, body, _ = self.admin(
            "POST",
            "/v1/admin/releases",
            "/v1/admin/releases",
            {
                "site": SITE,
                "procedure": PROCEDURE,
                "mode": "fcfs",
                "opens_at": (start - timedelta(days=4)).isoformat(),
                "slots": [{"starts_at": start.isoformat(), "duration_minutes": 15, "capacity": 1}],
            },
        )
        changed = 0
        if published == 201:
            path = f"/v1/admin/releases/{body['release']['id']}"
            name = "/v1/admin/releases/{release}"
            read, release, etag = self.admin("GET", path, name)
            if read == 200 and etag:
                slot = release["release"]["slots"][0]["id"]
                changed, _, _ = self.admin(
                    "PATCH",
                    path,
                    name,
                    {"slots": [{"id": slot, "capacity": 2}]},
                    {"If-Match": etag},
                )
        day = (datetime.now(UTC) + timedelta(days=3)).date().isoformat()
        agenda, _, _ = self.admin(
            "GET", f"/v1/admin/agenda?site={SITE}&date={day}", "/v1/admin/agenda"
        )
        if published == 201 and changed == 200 and agenda == 200:
            RUN.flows["Staff"] += 1


def _wait_for_draw(env: Environment, seconds: float = 30) -> dict[str, Any] | None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            return dict(_admin(env, "GET", f"/v1/releases/{RUN.release}/draw"))
        except OSError:
            time.sleep(0.5)  # the engine's sweeper draws within a second of draw_at
    return None


def _database(dsn: str, confirmed: list[str]) -> dict[str, int]:
    """The release as PostgreSQL has it (loadtests/dbcheck.py): slots, overbooked slots,
    confirmed bookings, the bots' buyers' among them, and the bookings answered confirmed
    that it does not have confirmed."""
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("dbcheck.py")), dsn, RUN.release, "Bot"],
        input=json.dumps(confirmed),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return dict(json.loads(out.stdout))


@events.quitting.add_listener
def _summary(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    record = _wait_for_draw(environment) if RUN.mode == "draw" else None
    # What the users counted, as it is now, once (an attempt still under way must not be
    # counted after PostgreSQL was read), then what PostgreSQL has.
    flows, confirmed = Counter(RUN.flows), sorted(RUN.confirmed)
    db = _database(opts.database_url, confirmed)
    users = RUN.users
    population = users.get("Person", 0) + RUN.buyers
    stats = environment.stats
    summary = {
        "scenario": RUN.mode,
        "release": RUN.release,
        "seconds": round(time.time() - RUN.started, 1),
        "users": dict(users),
        "total_rps": round(stats.total.total_rps, 1),
        "requests": [
            {
                "name": e.name,
                "method": e.method,
                "count": e.num_requests,
                "failures": e.num_failures,
                "rps": round(e.total_rps, 1),
                "p50_ms": e.get_response_time_percentile(0.5),
                "p95_ms": e.get_response_time_percentile(0.95),
                "p99_ms": e.get_response_time_percentile(0.99),
            }
            for e in sorted(stats.entries.values(), key=lambda e: e.name)
        ],
        "outcomes": {name: dict(c) for name, c in sorted(RUN.outcomes.items())},
        "flows": dict(flows),
        "fairness": {
            "places_won": db["bookings"],
            "bot_places": db["bot_bookings"],
            "bot_places_share": round(db["bot_bookings"] / db["bookings"], 3)
            if db["bookings"]
            else 0,
            "people": users.get("Person", 0),
            "bot_buyers": RUN.buyers,
            "bot_population_share": round(RUN.buyers / population, 3) if population else 0,
            "draw_entries": len(record["entries"]) if record else None,
        },
        "overbooked_slots": db["overbooked"],
        "confirmed_answered": len(confirmed),
        "confirmed_lost": db["missing"],
    }
    path = Path(opts.summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(
        json.dumps(
            {
                k: summary[k]
                for k in ("scenario", "flows", "fairness", "overbooked_slots", "confirmed_lost")
            }
        )
    )
    failures = [
        "slots overbooked" if db["overbooked"] else "",
        f"{db['missing']} bookings answered confirmed are not in PostgreSQL"
        if db["missing"]
        else "",
        "the release is not in this database (--database-url)" if not db["slots"] else "",
        "the draw never came" if RUN.mode == "draw" and record is None else "",
        "a spent challenge was granted a hold" if flows["Bot: spent challenge granted"] else "",
    ]
    if any(failures):
        print("load test failed: " + "; ".join(f for f in failures if f))
        environment.process_exit_code = 1
