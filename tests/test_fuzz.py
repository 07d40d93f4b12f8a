"""Fuzz the running engine from its own OpenAPI document.

A real ``python -m engine serve`` process is started on a free loopback port and seeded with
a site, an fcfs release (one booking and one hold on it) and a draw release. Schemathesis
loads ``/openapi.json`` from that process and sends generated requests, valid and invalid,
to every operation the document describes: its coverage phase (boundary values, missing and
unknown fields, wrong types, undeclared methods) then its fuzzing phase. Every response must
not be a 5xx, must use a documented status code and content type, must match the Problem
schema when it is an error, and operations that declare a bearer token must refuse a request
without one.

To reach past validation, seeded identifiers and plausible values (time zones, document
numbers, birth dates, emails) are mixed into the generated ones with schemathesis
dictionaries; a generated hold whose challenge is ``PAY`` gets a freshly solved challenge
instead. The admin token goes to the admin operations, the seeded hold and cancel tokens to
the operations on the seeded hold and booking, and the public operations get no credentials.
Each request comes from its own client address (the engine trusts X-Forwarded-For from
127.0.0.1), so the per-client token buckets do not turn the run into a wall of 429s.

The run is deterministic (fixed seed, derandomized Hypothesis, no example database) and
bounded (at most MAX_EXAMPLES fuzzed requests per operation, a timeout on every request).
Checks the document is too loose for are turned off below, each with the reason.
Schemathesis never sends requests to the operation that served it the document, so
``GET /openapi.json`` is left to test_contract.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
import requests
import schemathesis
from schemathesis.config import SchemathesisConfig

from engine.pow import solve
from tests.api import ADMIN, ADMIN_TOKEN, Api
from tests.conftest import DATABASE_URL, REDIS_URL
from tests.procs import Engine

SECRET = "fuzz-test-secret-" + "f" * 23
SEED = 20240611
MAX_EXAMPLES = 25
REQUEST_TIMEOUT_S = 10
PAY = "PAY"  # a generated hold with this challenge is paid with a real, solved one
SITE = "bobigny"
PROCEDURES = ("renouvellement", "premiere-demande")
EXTREME_TIMES = ["9999-12-31T23:59:59Z", "0001-01-01T00:00:00+01:00"]
DRAW_WINDOWS = ("registration_opens_at", "registration_closes_at", "draw_at")
NAMES = ["Zoë N'Diaye-Lefèvre", '=HYPERLINK("x")', "nul\u0000byte"]


@dataclass(frozen=True)
class Seeded:
    """What the fuzzer can aim at: identifiers, and the tokens that go with them."""

    releases: tuple[str, ...]
    slots: tuple[str, ...]
    hold_id: str
    hold_token: str
    reference: str
    cancel_token: str
    day: str
    times: tuple[str, ...]


class _Clock:
    """The wall clock, in the shape tests.api.Api expects."""

    @property
    def now(self) -> float:
        return time.time()

    @now.setter
    def now(self, value: float) -> None:
        pass  # Api.free() advances a fake clock; the real one moves by itself


class _Client:
    """Just enough of aiohttp's TestClient for tests.api.Api, aimed at a real server."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base_url = base_url

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._session.request(method, self._base_url + path, **kwargs)


@asynccontextmanager
async def _api(base_url: str) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(_Client(session, base_url), _Clock())  # type: ignore[arg-type]


async def _seed(base_url: str) -> Seeded:
    async with _api(base_url) as api:
        await api.site(SITE, PROCEDURES)
        fcfs = await api.publish([3, 2, 1], site=SITE, procedure=PROCEDURES[0])
        booked = await api.book(fcfs["slots"][0]["id"])
        hold = await api.hold(fcfs["slots"][1]["id"])
        assert hold.status == 201, hold.body
        now = datetime.now(UTC)
        draw = await api.call(
            "POST",
            "/v1/admin/releases",
            {
                "site": SITE,
                "procedure": PROCEDURES[1],
                "mode": "draw",
                "registration_opens_at": (now - timedelta(hours=1)).isoformat(),
                "registration_closes_at": (now + timedelta(days=7)).isoformat(),
                "draw_at": (now + timedelta(days=8)).isoformat(),
                "slots": [
                    {
                        "starts_at": (now + timedelta(days=30)).isoformat(),
                        "duration_minutes": 20,
                        "capacity": 4,
                    }
                ],
            },
            ADMIN,
        )
        assert draw.status == 201, draw.body
    first = datetime.fromisoformat(fcfs["slots"][0]["starts_at"])
    return Seeded(
        releases=(fcfs["id"], draw.body["release"]["id"]),
        slots=tuple(s["id"] for s in fcfs["slots"] + draw.body["release"]["slots"]),
        hold_id=hold.body["hold_id"],
        hold_token=hold.body["hold_token"],
        reference=booked["booking"]["reference"],
        cancel_token=booked["cancel_token"],
        day=first.astimezone(ZoneInfo("Europe/Paris")).date().isoformat(),
        times=tuple((now + timedelta(days=d)).isoformat() for d in (3, 10, 40)),
    )


@pytest.fixture
async def fuzz_target(clean: None, tmp_path: Path) -> AsyncIterator[tuple[Engine, Seeded]]:
    """A seeded engine process; stopped (and its log printed) at teardown."""
    engine = Engine(
        tmp_path,
        "fuzz",
        {
            "GUICHET_DATABASE_URL": DATABASE_URL,
            "GUICHET_REDIS_URL": REDIS_URL,
            "GUICHET_SECRET": SECRET,
            "GUICHET_ADMIN_TOKEN": ADMIN_TOKEN,
            "GUICHET_TRUSTED_PROXIES": "127.0.0.1",
            "GUICHET_POW_DIFFICULTY": "4",
            "GUICHET_POW_PUZZLES": "2",
        },
    )
    engine.start()
    try:
        await engine.wait_ready()
        yield engine, await _seed(engine.base_url)
    finally:
        engine.stop()
        print(engine.describe())


# Statuses that rightly refuse a request the document calls invalid: schemathesis's default
# list, plus 413 (a body over the size limit is refused before it is parsed).
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]


def _config(seeded: Seeded) -> SchemathesisConfig:
    def often(dictionary: str) -> dict[str, Any]:
        return {"dictionary": dictionary, "probability": 0.5}

    def mostly(dictionary: str) -> dict[str, Any]:
        return {"dictionary": dictionary, "probability": 0.8}

    return SchemathesisConfig.from_dict(
        {
            "seed": SEED,
            "request-timeout": REQUEST_TIMEOUT_S,
            # Generation speed depends on the machine's load, not on the engine
            "suppress-health-check": ["too_slow"],
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
            },
            "checks": {
                "negative_data_rejection": {"expected-statuses": [*REJECTIONS, "5xx"]},
                # The document cannot say what the request models' validators check (time
                # zones, document numbers, birth dates, the windows of each release mode,
                # the site id in the path, the 16 KiB body limit against maxItems 2000), so
                # much data it calls valid is rightly refused with 400 or 413.
                "positive_data_acceptance": {"enabled": False},
            },
            "dictionaries": {
                "sites": {"values": [SITE, "bobi\u0000gny"]},
                "procedures": {"values": list(PROCEDURES)},
                "releases": {"values": list(seeded.releases)},
                "slots": {"values": list(seeded.slots)},
                "holds": {"values": [seeded.hold_id]},
                "references": {"values": [seeded.reference]},
                "days": {"values": [seeded.day]},
                "pay": {"values": [PAY]},
                "timezones": {"values": ["Europe/Paris", "America/Cayenne", "UTC"]},
                "id-numbers": {"values": ["99 000 001", "ab-1234-5678", "X12345678"]},
                "birth-dates": {"values": ["1988-03-14", "1900-01-01"]},
                "emails": {"values": ["person@example.org"]},
                # Plausible times, and the extremes a date-time can take
                "times": {"values": [*seeded.times, *EXTREME_TIMES]},
                "names": {"values": NAMES},
            },
            "parameters": {
                "path.site": often("sites"),
                "query.site": often("sites"),
                "body.site": mostly("sites"),
                "query.procedure": often("procedures"),
                "body.procedure": mostly("procedures"),
                "path.release": often("releases"),
                "body.release": often("releases"),
                "body.slot_id": often("slots"),
                "body.slots[*].id": often("slots"),
                "body.challenge": often("pay"),
                "path.hold_id": often("holds"),
                "path.reference": often("references"),
                "query.date": often("days"),
                "body.timezone": often("timezones"),
                "body.applicant.id_number": often("id-numbers"),
                "body.applicant.birth_date": often("birth-dates"),
                "body.applicant.email": often("emails"),
                "body.opens_at": often("times"),
                "body.registration_opens_at": often("times"),
                "body.registration_closes_at": often("times"),
                "body.draw_at": often("times"),
                "body.slots[*].starts_at": often("times"),
                "body.name": often("names"),
                "body.procedures[*].name": often("names"),
                "body.applicant.family_name": often("names"),
                "body.applicant.given_names": often("names"),
            },
        }
    )


@pytest.fixture
def fuzz_schema(fuzz_target: tuple[Engine, Seeded]) -> Any:
    engine, seeded = fuzz_target
    schema = schemathesis.openapi.from_url(
        f"{engine.base_url}/openapi.json", config=_config(seeded), timeout=REQUEST_TIMEOUT_S
    )
    schema.config.update(base_url=engine.base_url)

    @schema.auth(refresh_interval=None)
    class Tokens:
        """The right bearer token for the operation, when there is one to give."""

        def get(self, case: Any, ctx: Any) -> str | None:
            path = ctx.operation.path
            params = case.path_parameters or {}
            if path.startswith("/v1/admin/"):
                return ADMIN_TOKEN
            if path.startswith("/v1/holds/") and params.get("hold_id") == seeded.hold_id:
                return seeded.hold_token
            if path.startswith("/v1/bookings/") and params.get("reference") == seeded.reference:
                return seeded.cancel_token
            return None  # public, or a resource we hold no token for: as generated

        def set(self, case: Any, data: str, ctx: Any) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    return schema


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(autouse=True)
def _schemathesis_on_pytest_9(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's ``from_fixture`` renames the running test through the private
    ``Node._nodeid``, which pytest 9.2 no longer has; give it one to work on."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


_addresses = itertools.count(1)


def _client_address() -> str:
    n = next(_addresses)
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def _valid(case: Any, method: str, path: str) -> bool:
    """A case of this operation that schemathesis generated as valid, with a JSON object body."""
    return (
        case.method.upper() == method
        and case.operation.path == path
        and isinstance(case.body, dict)
        and (case.meta is None or case.meta.generation.mode.is_positive)
    )


def _publishable(case: Any) -> None:
    """Steer a valid generated release past what the document cannot say, so that some get
    published: only the windows of its mode, and whole numbers written as integers (JSON
    Schema's integer 3.0 is refused by the engine's strict models)."""
    if not _valid(case, "POST", "/v1/admin/releases"):
        return
    drop = {"opens_at"} if case.body.get("mode") == "draw" else set(DRAW_WINDOWS)
    body = {k: v for k, v in case.body.items() if k not in drop}
    if isinstance(body.get("slots"), list):
        body["slots"] = [
            {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in s.items()}
            if isinstance(s, dict)
            else s
            for s in body["slots"]
        ]
    case.body = body


def _pay(case: Any, http: requests.Session, base_url: str, client: str) -> None:
    """Swap the PAY placeholder of a valid generated hold for a challenge solved for it."""
    if not _valid(case, "POST", "/v1/holds"):
        return
    body = case.body
    if body.get("challenge") != PAY or not isinstance(body.get("slot_id"), str):
        return
    release = body["slot_id"].split(".")[0]
    r = http.post(
        f"{base_url}/v1/challenges",
        json={"release": release},
        headers={"X-Forwarded-For": client},
        timeout=REQUEST_TIMEOUT_S,
    )
    if r.status_code != 201:
        return  # no such release, or not open: the placeholder stays, and is refused
    c = r.json()
    nonces = solve(c["challenge"], c["difficulty"], c["puzzles"])
    case.body = {**body, "challenge": c["challenge"], "nonces": nonces}


fuzzed = schemathesis.pytest.from_fixture("fuzz_schema")


@fuzzed.parametrize()
def test_every_operation_holds_to_the_document(
    case: Any, http: requests.Session, fuzz_target: tuple[Engine, Seeded]
) -> None:
    engine, _ = fuzz_target
    client = _client_address()
    _publishable(case)
    _pay(case, http, engine.base_url, client)
    case.call_and_validate(session=http, headers={"X-Forwarded-For": client})
