"""A small test client of the HTTP API: each method is one request, as a browser would send it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, BinaryIO, Protocol

from aiohttp.test_utils import TestClient

from engine.identity import Applicant
from engine.pow import solve
from tests.contract import check_reply

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
_people = itertools.count(1)


class Clock(Protocol):
    now: float


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any


def applicant(n: int | None = None, **overrides: str) -> dict[str, str]:
    """A distinct person each call (their document number differs)."""
    n = next(_people) if n is None else n
    person = {
        "family_name": f"Nom{n}",
        "given_names": f"Prénom {n}",
        "birth_date": "1988-03-14",
        "id_number": f"99{n:08d}",
        "email": f"person{n}@example.org",
    }
    person.update(overrides)
    return person


def as_applicant(person: dict[str, str]) -> Applicant:
    """``person`` (as ``applicant`` makes it) as the engine's model: for its identity hash,
    or a booking written to the store directly."""
    return Applicant(
        person["family_name"],
        person["given_names"],
        date.fromisoformat(person["birth_date"]),
        person["id_number"],
        person["email"],
    )


def other_than(text: str) -> str:
    """``text`` with its last character changed: a wrong token, a broken signature."""
    return text[:-1] + ("x" if text[-1] != "x" else "y")


def ip(n: int) -> str:
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Api:
    def __init__(self, client: TestClient, clock: Clock) -> None:
        self.client = client
        self.clock = clock

    async def call(
        self,
        method: str,
        path: str,
        json: Any = None,
        headers: dict[str, str] | None = None,
        data: bytes | BinaryIO | AsyncIterable[bytes] | None = None,
    ) -> Reply:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        async with self.client.request(method, path, **kwargs) as r:
            text = await r.text()
            ctype = r.headers.get("Content-Type", "")
            body: Any = text
            if "json" in ctype and text:
                body = await r.json(content_type=None)
            check_reply(method, path, r.status, ctype, body)
            return Reply(r.status, body, r.headers)

    # Staff --------------------------------------------------------------------------------

    async def site(
        self, site: str = "bobigny", procedures: tuple[str, ...] = ("renouvellement",)
    ) -> None:
        r = await self.call(
            "PUT",
            f"/v1/admin/sites/{site}",
            {
                "name": f"Site {site}",
                "timezone": "Europe/Paris",
                "procedures": [{"id": p, "name": p.title()} for p in procedures],
            },
            ADMIN,
        )
        assert r.status == 200, r.body

    async def publish(
        self,
        capacities: list[int],
        *,
        site: str = "bobigny",
        procedure: str = "renouvellement",
        opens_in_s: float = -60,
        starts_in_days: float = 2,
    ) -> dict[str, Any]:
        """Publish an fcfs release with one slot per capacity; return the release JSON."""
        now = datetime.fromtimestamp(self.clock.now, UTC)
        first = now + timedelta(days=starts_in_days)
        r = await self.call(
            "POST",
            "/v1/admin/releases",
            {
                "site": site,
                "procedure": procedure,
                "mode": "fcfs",
                "opens_at": (now + timedelta(seconds=opens_in_s)).isoformat(),
                "slots": [
                    {
                        "starts_at": (first + timedelta(minutes=15 * i)).isoformat(),
                        "duration_minutes": 15,
                        "capacity": c,
                    }
                    for i, c in enumerate(capacities)
                ],
            },
            ADMIN,
        )
        assert r.status == 201, r.body
        return r.body["release"]  # type: ignore[no-any-return]

    async def publish_draw(
        self,
        capacities: list[int],
        *,
        procedure: str = "renouvellement",
        opens_in_s: float = -60,
        closes_in_s: float = 86400,
        draw_in_s: float = 90000,
        starts_in_days: float = 3,
    ) -> dict[str, Any]:
        """Publish a draw release with one slot per capacity; return the release JSON."""
        now = datetime.fromtimestamp(self.clock.now, UTC)
        first = now + timedelta(days=starts_in_days)
        r = await self.call(
            "POST",
            "/v1/admin/releases",
            {
                "site": "bobigny",
                "procedure": procedure,
                "mode": "draw",
                "registration_opens_at": (now + timedelta(seconds=opens_in_s)).isoformat(),
                "registration_closes_at": (now + timedelta(seconds=closes_in_s)).isoformat(),
                "draw_at": (now + timedelta(seconds=draw_in_s)).isoformat(),
                "slots": [
                    {
                        "starts_at": (first + timedelta(minutes=15 * i)).isoformat(),
                        "duration_minutes": 15,
                        "capacity": c,
                    }
                    for i, c in enumerate(capacities)
                ],
            },
            ADMIN,
        )
        assert r.status == 201, r.body
        return r.body["release"]  # type: ignore[no-any-return]

    async def enter(
        self, release: str, person: dict[str, str] | None = None, client_ip: str = "10.0.0.1"
    ) -> Reply:
        paid = await self.solved(release, client_ip)
        return await self.call(
            "POST",
            f"/v1/releases/{release}/entries",
            {**paid, "applicant": person or applicant()},
            {"X-Forwarded-For": client_ip},
        )

    # Public -------------------------------------------------------------------------------

    async def challenge(self, release: str, client_ip: str = "10.0.0.1") -> dict[str, Any]:
        r = await self.call(
            "POST", "/v1/challenges", {"release": release}, {"X-Forwarded-For": client_ip}
        )
        assert r.status == 201, r.body
        return r.body  # type: ignore[no-any-return]

    async def solved(self, release: str, client_ip: str = "10.0.0.1") -> dict[str, Any]:
        c = await self.challenge(release, client_ip)
        return {
            "challenge": c["challenge"],
            "nonces": solve(c["challenge"], c["difficulty"], c["puzzles"]),
        }

    async def hold(
        self,
        slot_id: str,
        client_ip: str = "10.0.0.1",
        *,
        paid: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> Reply:
        release = slot_id.split(".")[0]
        paid = paid or await self.solved(release, client_ip)
        headers = {"X-Forwarded-For": client_ip}
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.call("POST", "/v1/holds", {"slot_id": slot_id, **paid}, headers)

    async def confirm(
        self,
        hold: dict[str, Any],
        person: dict[str, str] | None = None,
        client_ip: str = "10.0.0.1",
    ) -> Reply:
        return await self.call(
            "POST",
            f"/v1/holds/{hold['hold_id']}/confirm",
            {"applicant": person or applicant()},
            {"Authorization": f"Bearer {hold['hold_token']}", "X-Forwarded-For": client_ip},
        )

    async def book(
        self, slot_id: str, person: dict[str, str] | None = None, client_ip: str = "10.0.0.1"
    ) -> dict[str, Any]:
        """Hold and confirm; return the confirm reply's body."""
        h = await self.hold(slot_id, client_ip)
        assert h.status == 201, h.body
        c = await self.confirm(h.body, person, client_ip)
        assert c.status == 201, c.body
        return c.body  # type: ignore[no-any-return]

    async def free(self, release: str) -> dict[str, int]:
        self.clock.now += 1  # listings may be cached for up to a second
        r = await self.call("GET", f"/v1/releases/{release}/slots")
        assert r.status == 200, r.body
        return {s["id"]: s["free"] for s in r.body["slots"]}


def largest_release(now: float) -> dict[str, Any]:
    """The body of a first-come release of the most slots the schema takes (2 000): about
    250 KiB of JSON, over the public body limit and under staff's."""
    first = datetime.fromtimestamp(int(now), UTC) + timedelta(days=3)
    return {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "fcfs",
        "opens_at": first.isoformat(),
        "slots": [
            {
                "starts_at": (first + timedelta(minutes=15 * i)).isoformat(),
                "duration_minutes": 15,
                "capacity": 1,
            }
            for i in range(2000)
        ],
    }
