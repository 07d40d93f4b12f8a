"""Staff endpoints: sites, releases, capacity changes, counter bookings, the agenda."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine.app import create_app
from engine.appkeys import RESERVATIONS
from engine.store import Store, create_pool
from engine.sweeper import sweep_once
from tests.api import ADMIN, Api, applicant, ip
from tests.conftest import DATABASE_URL, FakeClock, make_settings, statements_run


async def test_site_upsert_and_listing(api: Api) -> None:
    await api.site("bobigny", ("renouvellement", "naturalisation"))
    await api.site("bobigny", ("renouvellement",))  # replaces: naturalisation goes
    r = await api.call("GET", "/v1/sites")
    assert r.body == {
        "sites": [
            {
                "id": "bobigny",
                "name": "Site bobigny",
                "timezone": "Europe/Paris",
                "procedures": [{"id": "renouvellement", "name": "Renouvellement"}],
            }
        ]
    }
    bad = await api.call(
        "PUT",
        "/v1/admin/sites/Bad_Id",
        {"name": "x", "timezone": "Mars/Olympus", "procedures": []},
        ADMIN,
    )
    assert bad.status == 400
    assert {e["field"] for e in bad.body["errors"]} == {"timezone"}
    # Zone files that load but name no place: "localtime" is each host's own zone.
    for zone in ("localtime", "posixrules", "Factory", "posix/Europe/Paris", "right/UTC"):
        bad = await api.call(
            "PUT", "/v1/admin/sites/b", {"name": "x", "timezone": zone, "procedures": []}, ADMIN
        )
        assert bad.status == 400, zone
        assert {e["field"] for e in bad.body["errors"]} == {"timezone"}, zone
    bad = await api.call(
        "PUT", "/v1/admin/sites/Bad_Id", {"name": "x", "timezone": "UTC", "procedures": []}, ADMIN
    )
    assert bad.status == 400 and bad.body["errors"][0]["field"] == "site"


async def test_a_site_upsert_answers_what_it_kept(api: Api) -> None:
    """A procedure a release still uses is kept when the site is replaced without it; the
    answer says so, as GET /v1/sites does, instead of echoing the request."""
    await api.site("bobigny", ("renouvellement", "naturalisation"))
    await api.publish([1], procedure="naturalisation")
    body = {"name": "Bobigny", "timezone": "Europe/Paris", "procedures": []}
    r = await api.call("PUT", "/v1/admin/sites/bobigny", body, ADMIN)
    assert r.status == 200
    listed = (await api.call("GET", "/v1/sites")).body["sites"]
    assert [r.body["site"]] == listed
    assert [p["id"] for p in r.body["site"]["procedures"]] == ["naturalisation"]


async def test_release_validation(api: Api, clock: FakeClock) -> None:
    await api.site()
    now = datetime.fromtimestamp(clock.now, UTC)
    slot = {
        "starts_at": (now + timedelta(days=1)).isoformat(),
        "duration_minutes": 15,
        "capacity": 1,
    }
    cases = [
        {"site": "bobigny", "procedure": "renouvellement", "mode": "fcfs", "slots": [slot]},
        {
            "site": "bobigny",
            "procedure": "renouvellement",
            "mode": "draw",
            "opens_at": now.isoformat(),
            "slots": [slot],
        },
        {
            "site": "bobigny",
            "procedure": "renouvellement",
            "mode": "fcfs",
            "opens_at": now.isoformat(),
            "slots": [],
        },
        {
            "site": "bobigny",
            "procedure": "renouvellement",
            "mode": "fcfs",
            "opens_at": now.isoformat(),
            "slots": [{**slot, "capacity": -1}],
        },
    ]
    for body in cases:
        r = await api.call("POST", "/v1/admin/releases", body, ADMIN)
        assert r.status == 400, (body, r.body)
    # One mistake on every one of 120 slots: each is listed, the detail names the first few.
    many = {**cases[0], "opens_at": now.isoformat(), "slots": [{**slot, "capacity": 10_001}] * 120}
    r = await api.call("POST", "/v1/admin/releases", many, ADMIN)
    assert r.status == 400, r.body
    assert [e["field"] for e in r.body["errors"]] == [f"slots.{i}.capacity" for i in range(120)]
    assert r.body["detail"].startswith("slots.0.capacity: ")
    assert r.body["detail"].endswith("; and 117 more (see errors)")
    assert r.body["detail"].count("slots.") == 3
    r = await api.call(
        "POST",
        "/v1/admin/releases",
        {
            "site": "bobigny",
            "procedure": "unknown",
            "mode": "fcfs",
            "opens_at": now.isoformat(),
            "slots": [slot],
        },
        ADMIN,
    )
    assert r.status == 404
    assert (await api.call("GET", "/v1/releases")).body == {"releases": []}


async def test_published_release_is_listed(api: Api) -> None:
    await api.site()
    release = await api.publish([2, 3])
    r = await api.call("GET", "/v1/releases?site=bobigny&procedure=renouvellement")
    assert [x["id"] for x in r.body["releases"]] == [release["id"]]
    assert r.body["releases"][0]["slots_total"] == 5
    assert r.body["releases"][0]["mode"] == "fcfs"
    assert (await api.call("GET", "/v1/releases?site=elsewhere")).body == {"releases": []}
    # Empty values filter nothing: API.md's own template, as a form sends it.
    r = await api.call("GET", "/v1/releases?site=&procedure=")
    assert r.status == 200 and [x["id"] for x in r.body["releases"]] == [release["id"]]


async def test_a_release_sent_again_with_its_idempotency_key_is_published_once(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """Staff whose POST got a 503 after the commit (or no answer) send it again: with the
    same Idempotency-Key they get the release it made, not a second release of the same
    appointments, which would offer each place twice."""
    await api.site()
    now = datetime.fromtimestamp(clock.now, UTC)
    body = {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "draw",
        "registration_opens_at": now.isoformat(),
        "registration_closes_at": (now + timedelta(days=1)).isoformat(),
        "draw_at": (now + timedelta(days=2)).isoformat(),
        "slots": [
            {
                "starts_at": (now + timedelta(days=3)).isoformat(),
                "duration_minutes": 15,
                "capacity": 2,
            }
        ],
    }
    keyed = {**ADMIN, "Idempotency-Key": "agenda-2026-12-week-49"}
    first = await api.call("POST", "/v1/admin/releases", body, keyed)
    again = await api.call("POST", "/v1/admin/releases", body, keyed)
    assert (first.status, again.status) == (201, 201), (first.body, again.body)
    assert again.body == first.body  # the same ids, and the draw's first seed commitment
    assert await pg.fetchval("SELECT count(*) FROM releases") == 1
    assert await pg.fetchval("SELECT count(*) FROM slots") == 1
    # Another key, or none, or other slots under the same key: another release.
    other = {**body, "slots": [{**body["slots"][0], "capacity": 3}]}
    for reply in (
        await api.call("POST", "/v1/admin/releases", body, {**ADMIN, "Idempotency-Key": "k2"}),
        await api.call("POST", "/v1/admin/releases", body, ADMIN),
        await api.call("POST", "/v1/admin/releases", other, keyed),
    ):
        assert reply.status == 201 and reply.body["release"]["id"] != first.body["release"]["id"]
    assert await pg.fetchval("SELECT count(*) FROM releases") == 4


async def test_capacity_never_below_booked_or_held(api: Api) -> None:
    await api.site()
    release = await api.publish([3])
    slot = release["slots"][0]["id"]
    await api.book(slot, client_ip=ip(1))
    await api.hold(slot, ip(2))
    path = f"/v1/admin/releases/{release['id']}"
    r = await api.call("PATCH", path, {"slots": [{"id": slot, "capacity": 1}]}, ADMIN)
    assert r.status == 400, r.body
    r = await api.call("PATCH", path, {"slots": [{"id": slot, "capacity": 2}]}, ADMIN)
    assert r.status == 200 and r.body["release"]["slots"][0]["capacity"] == 2
    assert await api.free(release["id"]) == {slot: 0}
    r = await api.call("PATCH", path, {"slots": [{"id": slot, "capacity": 5}]}, ADMIN)
    assert await api.free(release["id"]) == {slot: 3}


async def test_a_capacity_change_takes_as_many_statements_for_one_slot_as_for_many(
    api: Api,
) -> None:
    """A change of 40 slots' capacities sent 80 statements more than a change of one (two
    a slot), holding the release's and the slots' locks meanwhile: behind a PostgreSQL slow
    for a while, a staff booking on one of them waited for all of them, and failed."""
    await api.site()
    release = await api.publish([1] * 40)
    slots = [s["id"] for s in release["slots"]]
    pool = await create_pool(DATABASE_URL, timeout_s=5.0, size=1)
    store = Store(pool, 5.0, retry_after_s=2)
    now = datetime.fromtimestamp(api.clock.now, UTC)

    async def statements(capacities: dict[str, int]) -> int:
        return await statements_run(
            pool, lambda: store.patch_release(release["id"], {}, capacities, now, lower=lowered)
        )

    async def lowered(_booked: dict[str, int]) -> None:
        pass

    try:
        await statements({slots[0]: 2})  # its statements prepared, their types looked up
        one = await statements({slots[0]: 3})
        assert await statements(dict.fromkeys(slots, 3)) == one
        capacities = "SELECT DISTINCT capacity FROM slots WHERE release_id = $1"
        async with pool.acquire() as conn:
            assert [r["capacity"] for r in await conn.fetch(capacities, release["id"])] == [3]
    finally:
        await pool.close()


async def test_a_capacity_change_of_a_slot_not_in_the_release_is_not_found(api: Api) -> None:
    await api.site()
    release, other = await api.publish([1, 1]), await api.publish([1])
    path = f"/v1/admin/releases/{release['id']}"
    for slot in ("s" + "0" * 12, other["slots"][0]["id"]):
        change = {
            "slots": [{"id": release["slots"][0]["id"], "capacity": 2}, {"id": slot, "capacity": 2}]
        }
        r = await api.call("PATCH", path, change, ADMIN)
        assert r.status == 404, r.body
        assert slot in r.body["detail"]
    assert [
        s["capacity"]
        for s in (await api.call("GET", f"{path}", headers=ADMIN)).body["release"]["slots"]
    ] == [1, 1]


async def test_a_refused_capacity_change_changes_no_slot(api: Api, pg: asyncpg.Connection) -> None:
    """Two slots lowered at once, one below its held place: 400 names that slot, and neither
    capacity changed, in PostgreSQL or in Redis."""
    await api.site()
    release = await api.publish([3, 3])
    first, second = (s["id"] for s in release["slots"])
    await api.hold(second, ip(2))
    path = f"/v1/admin/releases/{release['id']}"
    lower = {"slots": [{"id": first, "capacity": 1}, {"id": second, "capacity": 0}]}
    r = await api.call("PATCH", path, lower, ADMIN)
    assert r.status == 400, r.body
    assert [e["field"] for e in r.body["errors"]] == [f"slots.{second}.capacity"]
    capacities = "SELECT capacity FROM slots WHERE release_id = $1 ORDER BY id"
    assert [r["capacity"] for r in await pg.fetch(capacities, release["id"])] == [3, 3]
    assert await api.free(release["id"]) == {first: 3, second: 2}


async def test_windows_change_only_before_they_start(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """Nor within the 4 s every worker takes to see a change (each keeps a release for up
    to 2 s): a release opening in 3 s, postponed, opened on the other workers at its old
    time, bots' holds granted there while the public waited. Each change is in the audit
    log, with what it changed from."""
    await api.site()
    opened = await api.publish([1])
    later = await api.publish([1], opens_in_s=3600)
    imminent = await api.publish([1], opens_in_s=3)
    soon, too_soon = (datetime.fromtimestamp(clock.now + s, UTC).isoformat() for s in (60, 3))
    for release, opens_at in ((opened, soon), (imminent, soon), (later, too_soon)):
        path = f"/v1/admin/releases/{release['id']}"
        r = await api.call("PATCH", path, {"opens_at": opens_at}, ADMIN)
        assert r.status == 400 and r.body["errors"][0]["field"] == "opens_at", r.body
    slot = later["slots"][0]["id"]
    change = {"opens_at": soon, "slots": [{"id": slot, "capacity": 4}]}
    r = await api.call("PATCH", f"/v1/admin/releases/{later['id']}", change, ADMIN)
    assert r.status == 200, r.body
    audited = await pg.fetch(
        "SELECT actor, subject, detail FROM audit_log WHERE action = 'release.patch'"
    )
    assert [(a["actor"], a["subject"]) for a in audited] == [("admin", later["id"])]
    detail = json.loads(audited[0]["detail"])
    was = detail["before"]["windows"].pop("opens_at")
    assert datetime.fromisoformat(was) == datetime.fromisoformat(later["opens_at"])
    assert detail == {
        "windows": {"opens_at": soon},
        "capacities": {slot: 4},
        "before": {"windows": {}, "capacities": {slot: 1}},
        "agent": "admin",
    }
    clock.advance(61)
    assert (await api.hold(later["slots"][0]["id"])).status == 201


async def test_staff_cannot_book_before_the_public(api: Api) -> None:
    """A first-come release opens to everyone at once: a place taken at the counter
    before the opening is one the people online never had a chance at (and what an
    insider would sell). The counter books from the opening, as the public does."""
    await api.site()
    release = await api.publish([1], opens_in_s=3600)
    staff = {"slot_id": release["slots"][0]["id"], "applicant": applicant()}
    early = await api.call("POST", "/v1/admin/bookings", staff, ADMIN)
    assert early.status == 409 and early.body["type"] == "/problems/not-open", early.body
    assert early.body["retry_after"] in (3600, 3601), early.body  # rounded up, to the µs
    api.clock.advance(3600)
    assert (await api.call("POST", "/v1/admin/bookings", staff, ADMIN)).status == 201


async def test_a_counter_booking_sent_again_with_its_key_is_booked_once(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A counter booking whose answer is lost (the agent's network, a 503 after the
    commit) and that is sent again was refused as the person's second booking, and their
    cancel token was lost with the first answer. With an Idempotency-Key, the same request
    again gets the same booking and cancel token back, once or many at a time, even on a
    full slot; the key used again for another person books that person, and with a name
    corrected is another request."""
    await api.site()
    release = await api.publish([1, 1])
    first, second = (s["id"] for s in release["slots"])
    person = applicant()

    async def book(slot: str, who: dict[str, str], key: str) -> Any:
        body = {"slot_id": slot, "applicant": who}
        return await api.call("POST", "/v1/admin/bookings", body, {**ADMIN, "Idempotency-Key": key})

    sent = await asyncio.gather(*(book(first, person, "desk-3-0915") for _ in range(12)))
    booked = sent[0]
    assert booked.status == 201, booked.body
    assert [(r.status, r.body) for r in sent] == [(201, booked.body)] * 12
    assert (await book(first, person, "desk-3-0915")).body == booked.body
    reference = booked.body["booking"]["reference"]
    cancel = {"Authorization": f"Bearer {booked.body['cancel_token']}"}
    assert (await api.call("GET", f"/v1/bookings/{reference}", headers=cancel)).status == 200
    other = await book(second, applicant(), "desk-3-0915")  # the same key, another person
    assert other.status == 201 and other.body["booking"]["reference"] != reference
    elsewhere = await book(second, person, "desk-3-0915")  # this person, another slot
    assert elsewhere.status == 409, elsewhere.body
    corrected = await book(first, {**person, "given_names": "Corrigé"}, "desk-3-0915")
    # Another request (here for a full slot), not the first one's replay with the name
    # silently dropped.
    assert (corrected.status, corrected.body["type"]) == (409, "/problems/slot-full")
    rows = await pg.fetch("SELECT reference FROM bookings ORDER BY reference")
    assert sorted(r["reference"] for r in rows) == sorted(
        [reference, other.body["booking"]["reference"]]
    )
    audited = await pg.fetchval("SELECT count(*) FROM audit_log WHERE action = 'booking.confirm'")
    assert audited == 2
    domain = api.client.app[RESERVATIONS]
    counts = await domain.inventory.counts(release["id"], domain.now_ms())
    assert {s: (c.booked, c.held) for s, c in counts.items()} == {first: (1, 0), second: (1, 0)}
    assert await domain.recovery.reconcile(release["id"]) == 0


async def test_a_retry_that_waited_for_its_first_try_is_not_refused_by_its_caps(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A retry sent while its first try is still in PostgreSQL (or timed out there, and went
    on) waits in book_hold for the person's locks. It then counted the first try's booking
    against the caps: here the email's fourth active booking, a 429 for a booking that was
    made. book_hold looks for the hold's booking again once it has the locks."""
    await api.site()
    release = await api.publish([1, 1, 1, 1])
    slots = [s["id"] for s in release["slots"]]
    family = "famille.diallo@example.org"
    for slot in slots[:3]:
        body = {"slot_id": slot, "applicant": applicant(email=family)}
        assert (await api.call("POST", "/v1/admin/bookings", body, ADMIN)).status == 201
    email_hash = await pg.fetchval("SELECT email_hash FROM bookings LIMIT 1")
    lock = "('x' || substr(encode($1::bytea, 'hex'), 1, 15))::bit(60)::bigint"
    await pg.execute(f"SELECT pg_advisory_lock({lock})", email_hash)
    body = {"slot_id": slots[3], "applicant": applicant(email=family)}
    keyed = {**ADMIN, "Idempotency-Key": "desk-1-1042"}
    sent = [asyncio.create_task(api.call("POST", "/v1/admin/bookings", body, keyed)) for _ in "ab"]
    # Both in book_hold: the first waits for the email's lock, the retry for the person's.
    waiting = """SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database
                  WHERE l.locktype = 'advisory' AND NOT l.granted
                    AND d.datname = current_database()"""
    for _ in range(1000):
        if await pg.fetchval(waiting) == 2:
            break
        await asyncio.sleep(0.01)
    await pg.execute(f"SELECT pg_advisory_unlock({lock})", email_hash)
    first, retry = await asyncio.gather(*sent)
    assert (first.status, retry.status) == (201, 201), (first.body, retry.body)
    assert first.body == retry.body
    assert await pg.fetchval("SELECT count(*) FROM bookings") == 4


async def test_staff_booking_and_agenda(api: Api, pg: asyncpg.Connection) -> None:
    await api.site()
    # Both slots on one day in Paris, whatever the time of the run (slots 15 minutes apart
    # starting after 23:45 fall on two days, and the agenda is a day's).
    now = datetime.fromtimestamp(api.clock.now, ZoneInfo("Europe/Paris"))
    noon = (now + timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)
    release = await api.publish([2, 1], starts_in_days=(noon - now) / timedelta(days=1))
    first, second = (s["id"] for s in release["slots"])
    person = applicant(family_name='=HYPERLINK("x")', given_names="Éloïse")
    r = await api.call("POST", "/v1/admin/bookings", {"slot_id": first, "applicant": person}, ADMIN)
    assert r.status == 201 and r.body["booking"]["status"] == "confirmed"
    again = await api.call(
        "POST", "/v1/admin/bookings", {"slot_id": second, "applicant": person}, ADMIN
    )
    assert again.status == 409 and again.body["type"] == "/problems/identity-already-booked"
    online = await api.book(second, applicant(family_name="Zola"))
    day = release["slots"][0]["starts_at"][:10]
    agenda = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers=ADMIN)
    assert agenda.status == 200
    rows = agenda.body["bookings"]
    assert [b["reference"] for b in rows] == [
        r.body["booking"]["reference"],
        online["booking"]["reference"],
    ]
    assert rows[0]["channel"] == "staff" and rows[1]["channel"] == "online"
    assert "id_number" not in rows[0] and "email" not in rows[0]
    as_csv = await api.call(
        "GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers={**ADMIN, "Accept": "text/csv"}
    )
    assert as_csv.status == 200 and as_csv.headers["Content-Type"].startswith("text/csv")
    assert as_csv.body.startswith("starts_at,")  # as API.md has it: no byte-order mark
    table = list(csv.DictReader(io.StringIO(as_csv.body)))
    assert [row["reference"] for row in table] == [b["reference"] for b in rows]
    assert table[0]["family_name"] == '\'=HYPERLINK("x")'
    assert table[1]["family_name"] == "Zola" and table[0]["given_names"] == "Éloïse"
    # For a spreadsheet: a byte-order mark, which it needs to read the accents as UTF-8,
    # and semicolons for one set to French, which opens a comma file as one column.
    semicolons = await api.call(
        "GET",
        f"/v1/admin/agenda?site=bobigny&date={day}&separator=semicolon&bom=true",
        headers={**ADMIN, "Accept": "text/csv"},
    )
    assert semicolons.status == 200 and semicolons.body.startswith("\ufeffstarts_at;")
    body = semicolons.body.removeprefix("\ufeff")
    assert list(csv.DictReader(io.StringIO(body), delimiter=";")) == table
    for query in ("separator=tab", "separator=", "separator=;", "bom=yes", "bom="):
        r = await api.call(
            "GET",
            f"/v1/admin/agenda?site=bobigny&date={day}&{query}",
            headers={**ADMIN, "Accept": "text/csv"},
        )
        assert r.status == 400, query
        assert r.body["errors"][0]["field"] == query.split("=")[0], query
    bad = await api.call(
        "GET",
        f"/v1/admin/agenda?site=bobigny&date={day}",
        headers={**ADMIN, "Accept": "application/pdf"},
    )
    assert bad.status == 406
    # The Accept header's weights decide, not the mere mention of a type.
    for accept, served in (
        ("text/csv;q=0, application/json", "application/json"),
        ("application/json;q=0.5, text/csv", "text/csv"),
        ("text/*", "text/csv"),
        ("*/*", "application/json"),
        ("text/csv, */*", "text/csv"),
        ("text/csv;q=0.5, */*;q=0.5", "text/csv"),
    ):
        r = await api.call(
            "GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers={**ADMIN, "Accept": accept}
        )
        assert r.status == 200 and r.headers["Content-Type"].startswith(served), accept
    # Days past the years any time of the engine is in: a 500 before (the day after
    # 9999-12-31; 0001-01-01, which asyncpg cannot send in Paris time).
    for day_text in (
        *("nope", "20261201", "2026-W49-2", "2026-12-1"),
        *("0001-01-01", "9999-12-31", "1999-12-31", "2201-01-01"),
    ):
        r = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day_text}", headers=ADMIN)
        assert r.status == 400, day_text
        assert r.body["type"] == "/problems/validation-error", r.body
    assert (
        await api.call("GET", f"/v1/admin/agenda?site=nowhere&date={day}", headers=ADMIN)
    ).status == 404


async def test_each_agent_has_a_token_and_the_audit_log_names_them(clean: None) -> None:
    """One admin token for every agent could not tell them apart: who cancelled this
    booking, who moved that opening? Each agent's own token (GUICHET_ADMIN_TOKENS) names
    them in every audit row of their requests, counter bookings included, and in their log
    lines; the shared token's agent is "admin". A public request after them is nobody's.
    Staff read the log without SQL (GET /v1/admin/audit), filtered and a page at a time."""
    agents = (("amina", "a" * 40), ("bruno", "b" * 40))
    app = create_app(make_settings(admin_agents=agents), clock=FakeClock(), sweep=False)
    async with TestClient(TestServer(app)) as client:
        api = Api(client, FakeClock())

        def token(secret: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {secret}"}

        await api.site()  # the shared token
        release = await api.publish([2])
        slot = release["slots"][0]["id"]
        path = f"/v1/admin/releases/{release['id']}"
        body = {"slots": [{"id": slot, "capacity": 3}]}
        assert (await api.call("PATCH", path, body, token("a" * 40))).status == 200
        staff = {"slot_id": slot, "applicant": applicant()}
        booked = await api.call("POST", "/v1/admin/bookings", staff, token("b" * 40))
        assert booked.status == 201, booked.body
        reference = booked.body["booking"]["reference"]
        # A public request next (on the same connection): not bruno's.
        cancel = {"Authorization": f"Bearer {booked.body['cancel_token']}"}
        assert (await api.call("DELETE", f"/v1/bookings/{reference}", headers=cancel)).status == 204
        wrong = await api.call("PATCH", path, body, token("c" * 40))
        assert wrong.status == 401
        pg = await asyncpg.connect(DATABASE_URL)
        try:
            rows = await pg.fetch("SELECT actor, action, detail FROM audit_log ORDER BY id")
        finally:
            await pg.close()
        agents_of = [(r["action"], json.loads(r["detail"]).get("agent")) for r in rows]
        assert agents_of == [
            ("site.upsert", "admin"),
            ("release.create", "admin"),
            ("release.patch", "amina"),
            ("booking.confirm", "bruno"),
            ("booking.cancel", None),
        ]
        # Read without SQL: newest first, by agent, by subject, a page at a time.
        log = "/v1/admin/audit"
        everything = (await api.call("GET", log, headers=token("a" * 40))).body["entries"]
        assert [e["action"] for e in everything] == [a for a, _ in reversed(agents_of)]
        assert everything[0]["detail"] == {"by": "person", "place": "returned"}
        by_bruno = await api.call("GET", f"{log}?agent=bruno", headers=ADMIN)
        assert [e["subject"] for e in by_bruno.body["entries"]] == [reference]
        about = await api.call("GET", f"{log}?subject={reference}", headers=ADMIN)
        assert [e["action"] for e in about.body["entries"]] == ["booking.cancel", "booking.confirm"]
        first = await api.call("GET", f"{log}?limit=2", headers=ADMIN)
        last_id = first.body["entries"][-1]["id"]
        rest = await api.call("GET", f"{log}?limit=2&before={last_id}", headers=ADMIN)
        pages = first.body["entries"] + rest.body["entries"]
        assert [e["id"] for e in pages] == [e["id"] for e in everything[:4]]
        at = everything[-1]["at"]
        since = await api.call("GET", f"{log}?since={at.replace('+', '%2B')}", headers=ADMIN)
        assert len(since.body["entries"]) == 5
        until = await api.call("GET", f"{log}?until={at.replace('+', '%2B')}", headers=ADMIN)
        assert until.body["entries"] == []
        # Numbers of thousands of digits too: int() refuses them past 4 300 (a 500 before).
        long = "9" * 5000
        for bad in (
            *("limit=0", "limit=x", "before=-1", "since=yesterday", "agent=a%20b"),
            *(f"limit={long}", f"before={long}", f"limit=0{long}"),
        ):
            refused = await api.call("GET", f"{log}?{bad}", headers=ADMIN)
            assert refused.status == 400, (bad, refused.body)
        padded = await api.call("GET", f"{log}?limit={'0' * 5000}1", headers=ADMIN)
        assert len(padded.body["entries"]) == 1, padded.body  # a whole number all the same
        assert (await api.call("GET", log)).status == 401


async def test_the_counter_checks_a_booking_against_the_document_shown(
    api: Api, pg: asyncpg.Connection
) -> None:
    """A reseller books under the buyer's name and a made-up document number: the agenda
    shows names and birth dates only, so the booking passed the counter, and one person
    could hold several. The agent types the number of the document shown: the engine says
    whether the booking was made under it (the number is kept by nobody, only its keyed
    hash), and the check is audited."""
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    buyer = applicant(id_number="AB-12 3456")
    honest = await api.book(slot, buyer)
    resold = await api.book(slot, {**buyer, "id_number": "ZZ999999"})  # the buyer's name
    path = "/v1/admin/bookings/{}/identity-check"

    async def check(booked: dict[str, Any], shown: str, headers: dict[str, str] = ADMIN) -> Any:
        reference = booked["booking"]["reference"]
        return await api.call("POST", path.format(reference), {"id_number": shown}, headers)

    for shown in ("AB-12 3456", "ab123456"):  # as typed, or without its spaces and dashes
        assert (await check(honest, shown)).body == {"matches": True}
    assert (await check(resold, "AB123456")).body == {"matches": False}
    assert (await check(honest, "AB")).status == 400
    assert (await check(honest, "AB123456", {})).status == 401
    missing = {"booking": {"reference": "00-0000-0000"}}
    assert (await check(missing, "AB123456")).status == 404
    audited = await pg.fetch(
        "SELECT subject, detail FROM audit_log WHERE action = 'booking.identity_check' ORDER BY id"
    )
    assert [(r["subject"], json.loads(r["detail"])["matches"]) for r in audited] == [
        (honest["booking"]["reference"], True),
        (honest["booking"]["reference"], True),
        (resold["booking"]["reference"], False),
    ]


async def test_staff_cancel_for_a_person(api: Api, pg: asyncpg.Connection) -> None:
    """A person who booked at the counter or on the phone cancels the same way: staff
    cancel with the admin token, and the place returns as with the person's cancel."""
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    person = applicant()
    staff = {"slot_id": slot, "applicant": person}
    booked = (await api.call("POST", "/v1/admin/bookings", staff, ADMIN)).body
    ref = booked["booking"]["reference"]
    assert await api.free(release["id"]) == {slot: 0}
    path = f"/v1/admin/bookings/{ref}"
    assert (await api.call("DELETE", path, headers={"Authorization": "Bearer nope"})).status == 401
    assert (await api.call("DELETE", path, headers=ADMIN)).status == 204
    assert (await api.call("DELETE", path, headers=ADMIN)).status == 204  # idempotent
    assert await api.free(release["id"]) == {slot: 1}
    mine = {"Authorization": f"Bearer {booked['cancel_token']}"}
    read = await api.call("GET", f"/v1/bookings/{ref}", headers=mine)
    assert read.body["booking"]["status"] == "cancelled"
    actor = await pg.fetchval(
        "SELECT actor FROM audit_log WHERE subject = $1 AND action = 'booking.cancel'", ref
    )
    assert actor == "staff"
    # The person may book again: the cancelled booking is not active.
    assert (await api.call("POST", "/v1/admin/bookings", staff, ADMIN)).status == 201
    for missing in ("AB-CDEF-GHJK", "nope%00"):
        r = await api.call("DELETE", f"/v1/admin/bookings/{missing}", headers=ADMIN)
        assert r.status == 404


async def test_a_cancel_by_the_prefecture_counts_toward_none_of_the_persons_caps(
    api: Api, pg: asyncpg.Connection
) -> None:
    """The prefecture calls off a person's appointment (a closure, an agent absent) with
    `?by=prefecture`: neither the booking nor its cancellation counts toward the person's
    caps (3 bookings, 2 cancellations in 30 days), so they book again as often as it
    happens. A cancel for the person counts, as their own would. The booking says who
    cancelled it, so that the site can tell the person. A wrong `by` changes nothing."""
    await api.site()
    release = await api.publish([1])
    slot = release["slots"][0]["id"]
    person = applicant()
    staff = {"slot_id": slot, "applicant": person}

    tokens = {}

    async def book() -> str:
        r = await api.call("POST", "/v1/admin/bookings", staff, ADMIN)
        assert r.status == 201, r.body
        ref = str(r.body["booking"]["reference"])
        tokens[ref] = {"Authorization": f"Bearer {r.body['cancel_token']}"}
        assert "cancelled_by" not in r.body["booking"]
        return ref

    async def cancelled_by(ref: str) -> str:
        r = await api.call("GET", f"/v1/bookings/{ref}", headers=tokens[ref])
        assert r.body["booking"]["status"] == "cancelled"
        return str(r.body["booking"]["cancelled_by"])

    ref = await book()
    bad = await api.call("DELETE", f"/v1/admin/bookings/{ref}?by=nobody", headers=ADMIN)
    assert bad.status == 400 and bad.body["errors"][0]["field"] == "by"
    assert await pg.fetchval("SELECT status FROM bookings WHERE reference = $1", ref) == (
        "confirmed"
    )
    for _ in range(3):
        path = f"/v1/admin/bookings/{ref}?by=prefecture"
        assert (await api.call("DELETE", path, headers=ADMIN)).status == 204
        assert await cancelled_by(ref) == "prefecture"
        ref = await book()
    # Four bookings, three of them called off by the prefecture: none counted. The person's
    # own cancels count: after two, the third booking is refused.
    assert (await api.call("DELETE", f"/v1/admin/bookings/{ref}", headers=ADMIN)).status == 204
    assert await cancelled_by(ref) == "person"
    ref = await book()
    assert (await api.call("DELETE", f"/v1/admin/bookings/{ref}", headers=ADMIN)).status == 204
    r = await api.call("POST", "/v1/admin/bookings", staff, ADMIN)
    assert r.status == 429 and "2 cancellations" in r.body["detail"], r.body
    # A confirm's retry that reaches book_hold once its booking was cancelled (the hold's
    # booking found by ON CONFLICT) says who cancelled it too.
    first = await pg.fetchrow("SELECT * FROM bookings WHERE cancelled_by = 'prefecture' LIMIT 1")
    domain = api.client.app[RESERVATIONS]
    again = await domain.store.book(
        reference="AB-RETR-YAGN",
        release=await domain.release(first["release_id"]),
        slot_id=first["slot_id"],
        channel="staff",
        hold_id=first["hold_id"],
        hold_token_hash=first["hold_token_hash"],
        identity_hash=first["identity_hash"],
        email_hash=first["email_hash"],
        family_name=first["family_name"],
        given_names=first["given_names"],
        birth_date=first["birth_date"],
        cancel_token_hash=first["cancel_token_hash"],
    )
    assert (again.reference, again.cancelled_by) == (first["reference"], "prefecture")
    rows = await pg.fetch(
        "SELECT cancelled_by, count(*) FROM bookings GROUP BY 1 ORDER BY 1 NULLS LAST"
    )
    assert [tuple(r) for r in rows] == [("person", 2), ("prefecture", 3)]
    audit = await pg.fetch(
        "SELECT detail->>'by' AS by FROM audit_log WHERE action = 'booking.cancel' ORDER BY id"
    )
    assert [r["by"] for r in audit] == ["prefecture"] * 3 + ["person"] * 2


async def test_a_place_withdrawn_with_its_cancel_goes_to_nobody(
    api: Api, pg: asyncpg.Connection
) -> None:
    """The prefecture calls off an appointment and takes its place off the slot
    (`?by=prefecture&place=withdraw`): the slot's capacity goes one lower with the cancel,
    in PostgreSQL and in Redis, so the place is never free for anyone, and a retry lowers
    nothing more. Redis then agrees with PostgreSQL: the reconcile corrects nothing. A
    withdrawal must say who cancels; a cancel sent again on other terms is told it changed
    nothing (409), while the person's own cancel stays idempotent."""
    await api.site()
    release = await api.publish([2])
    slot = release["slots"][0]["id"]
    refs, tokens = [], []
    for _ in range(2):
        booked = await api.call(
            "POST", "/v1/admin/bookings", {"slot_id": slot, "applicant": applicant()}, ADMIN
        )
        refs.append(booked.body["booking"]["reference"])
        tokens.append({"Authorization": f"Bearer {booked.body['cancel_token']}"})
    path = f"/v1/admin/bookings/{refs[0]}"
    for query, field in (("place=keep", "place"), ("place=withdraw", "by")):
        bad = await api.call("DELETE", f"{path}?{query}", headers=ADMIN)
        assert bad.status == 400 and bad.body["errors"][0]["field"] == field, bad.body
    for _ in range(2):  # the retry changes nothing
        r = await api.call("DELETE", f"{path}?by=prefecture&place=withdraw", headers=ADMIN)
        assert r.status == 204
    assert await api.free(release["id"]) == {slot: 0}
    row = await pg.fetchrow("SELECT capacity, booked FROM slots WHERE id = $1", slot)
    assert (row["capacity"], row["booked"]) == (1, 1)
    other = await api.call("DELETE", path, headers=ADMIN)
    assert other.status == 409 and other.body["type"].endswith("cancelled-otherwise"), other.body
    assert "by the prefecture, its place withdrawn" in other.body["detail"]
    own = await api.call("DELETE", f"/v1/bookings/{refs[0]}", headers=tokens[0])
    assert own.status == 204
    domain = api.client.app[RESERVATIONS]
    assert (await sweep_once(domain, reconcile=True)).corrections == 0
    # The other booking's cancel returns its place as before; withdrawing it then is refused,
    # and tells staff the place went back.
    assert (await api.call("DELETE", f"/v1/bookings/{refs[1]}", headers=tokens[1])).status == 204
    assert await api.free(release["id"]) == {slot: 1}
    late = f"/v1/admin/bookings/{refs[1]}?by=prefecture&place=withdraw"
    refused = await api.call("DELETE", late, headers=ADMIN)
    assert refused.status == 409 and "its place returned" in refused.body["detail"]
    assert await api.free(release["id"]) == {slot: 1}
    details = await pg.fetch(
        "SELECT detail FROM audit_log WHERE action = 'booking.cancel' ORDER BY id"
    )
    assert [json.loads(r["detail"]) for r in details] == [
        {"by": "prefecture", "place": "withdrawn", "agent": "admin"},
        {"by": "person", "place": "returned"},  # online, by the person: no agent
    ]


async def test_a_change_made_against_an_old_read_is_refused(
    api: Api, pg: asyncpg.Connection
) -> None:
    """Staff read a release (its ETag with it), then the prefecture withdraws a booking's
    place. A PATCH made against that read, with ``If-Match``, is refused (412) and changes
    nothing, where without it the capacity it sends would put the withdrawn place back.
    Bookings do not change the ETag: a busy release can still be changed."""
    await api.site()
    release = await api.publish([2, 5])
    slot = release["slots"][0]["id"]
    path = f"/v1/admin/releases/{release['id']}"

    async def read() -> Any:
        r = await api.call("GET", path, headers=ADMIN)
        assert r.status == 200 and r.headers["ETag"].startswith('"'), r.headers
        return r

    async def patch(capacity: int, if_match: str) -> Any:
        body = {"slots": [{"id": slot, "capacity": capacity}]}
        return await api.call("PATCH", path, body, {**ADMIN, "If-Match": if_match})

    first = await read()
    assert first.body["release"]["slots"][0]["capacity"] == 2
    etag = first.headers["ETag"]
    booked = await api.call(
        "POST", "/v1/admin/bookings", {"slot_id": slot, "applicant": applicant()}, ADMIN
    )
    assert booked.status == 201
    again = await read()
    assert again.headers["ETag"] == etag
    assert (
        again.body["release"]["slots"][0] | {"capacity": 2, "booked": 1}
        == (again.body["release"]["slots"][0])
    )
    reference = booked.body["booking"]["reference"]
    cancel = f"/v1/admin/bookings/{reference}?by=prefecture&place=withdraw"
    assert (await api.call("DELETE", cancel, headers=ADMIN)).status == 204

    stale = await patch(2, etag)
    assert (stale.status, stale.body["type"]) == (412, "/problems/precondition-failed")
    assert await pg.fetchval("SELECT capacity FROM slots WHERE id = $1", slot) == 1
    assert await api.free(release["id"]) == {slot: 1, release["slots"][1]["id"]: 5}

    fresh = await read()
    assert fresh.headers["ETag"] != etag
    weak = await patch(2, "W/" + fresh.headers["ETag"])
    assert weak.status == 412  # If-Match compares strongly
    changed = await patch(2, f'"not-this-one", {fresh.headers["ETag"]}')
    assert changed.status == 200
    assert changed.headers["ETag"] == (await read()).headers["ETag"] != fresh.headers["ETag"]
    assert (await patch(3, "*")).status == 200
    for bad in ("abc", '"a", *'):
        refused = await patch(3, bad)
        assert refused.status == 400 and refused.body["errors"][0]["field"] == "If-Match"
    assert await pg.fetchval("SELECT capacity FROM slots WHERE id = $1", slot) == 3
    assert (await api.call("GET", "/v1/admin/releases/r000000000000", headers=ADMIN)).status == 404
    assert (await api.call("GET", path)).status == 401


async def test_calling_off_a_slot_as_the_readme_says(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """The README's recipe for a closure: close the free places (the 400 names the floor
    while a place is held), withdraw each booking, then 0 once the hold has expired. No
    place is free at any step."""
    await api.site()
    release = await api.publish([4])
    slot = release["slots"][0]["id"]
    refs = []
    for _ in range(2):
        booked = await api.call(
            "POST", "/v1/admin/bookings", {"slot_id": slot, "applicant": applicant()}, ADMIN
        )
        refs.append(booked.body["booking"]["reference"])
    assert (await api.hold(slot, ip(3))).status == 201
    path = f"/v1/admin/releases/{release['id']}"

    async def capacity(n: int) -> Any:
        return await api.call("PATCH", path, {"slots": [{"id": slot, "capacity": n}]}, ADMIN)

    r = await capacity(2)
    assert r.status == 400 and "cannot go below 3 (booked and held places)" in str(r.body)
    assert (await capacity(3)).status == 200
    assert await api.free(release["id"]) == {slot: 0}
    for ref in refs:
        query = "by=prefecture&place=withdraw"
        assert (
            await api.call("DELETE", f"/v1/admin/bookings/{ref}?{query}", headers=ADMIN)
        ).status == 204
        assert await api.free(release["id"]) == {slot: 0}
    assert (await capacity(0)).status == 400  # the place still held
    clock.advance(601)  # the hold expires
    assert (await capacity(0)).status == 200
    row = await pg.fetchrow("SELECT capacity, booked FROM slots WHERE id = $1", slot)
    assert (row["capacity"], row["booked"]) == (0, 0)
    assert await api.free(release["id"]) == {slot: 0}


async def test_identity_is_hashed_and_only_staff_fields_are_clear(
    api: Api, pg: asyncpg.Connection
) -> None:
    await api.site()
    release = await api.publish([1])
    person = applicant(id_number="AB 12-34-56", email="Someone@Example.org")
    await api.book(release["slots"][0]["id"], person)
    row = await pg.fetchrow("SELECT * FROM bookings")
    # Text columns as text, hashes as bytes: a random hash or booking reference may well
    # show "AB" (it did, once in a few hundred runs), the person's number never.
    text = " ".join(str(v) for v in row.values() if not isinstance(v, bytes)).lower()
    for clear in ("ab123456", "ab 12-34-56", "12-34-56", "someone@example.org"):
        assert clear not in text
    for value in row.values():
        if isinstance(value, bytes):
            assert b"AB123456" not in value and b"example.org" not in value.lower()
    assert len(row["identity_hash"]) == 32 and len(row["cancel_token_hash"]) == 32


async def test_an_opening_after_every_slot_and_a_slot_named_twice_are_refused(
    api: Api,
) -> None:
    """A first-come release opening after its last slot starts has nothing to offer, as
    published or moved there by a change. (A draw may come after its own slots: it gives
    places its procedure carried over.) And a change naming one slot twice gave it the
    last capacity named."""
    await api.site()
    now = datetime.fromtimestamp(api.clock.now, UTC)
    slot = {"starts_at": (now + timedelta(days=2)).isoformat(), "duration_minutes": 15}
    late_opening = {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "fcfs",
        "opens_at": (now + timedelta(days=3)).isoformat(),
        "slots": [{**slot, "capacity": 1}],
    }
    r = await api.call("POST", "/v1/admin/releases", late_opening, ADMIN)
    assert r.status == 400 and "opens_at" in str(r.body["errors"]), r.body
    early = await api.publish([1], opens_in_s=3600)
    path = f"/v1/admin/releases/{early['id']}"
    moved = await api.call("PATCH", path, {"opens_at": late_opening["opens_at"]}, ADMIN)
    assert moved.status == 400 and moved.body["errors"][0]["field"] == "opens_at", moved.body
    unchanged = (await api.call("GET", path, headers=ADMIN)).body["release"]
    assert unchanged["opens_at"] == early["opens_at"], unchanged
    release = await api.publish([1])
    slot_id = release["slots"][0]["id"]
    twice = {"slots": [{"id": slot_id, "capacity": 5}, {"id": slot_id, "capacity": 2}]}
    r = await api.call("PATCH", f"/v1/admin/releases/{release['id']}", twice, ADMIN)
    assert r.status == 400 and r.body["type"] == "/problems/validation-error", r.body
    now_is = await api.call("GET", f"/v1/admin/releases/{release['id']}", headers=ADMIN)
    assert now_is.body["release"]["slots"][0]["capacity"] == 1, now_is.body


async def test_a_time_whose_offset_is_not_the_sites_is_refused(api: Api) -> None:
    """Times were kept as written, whatever their offset: a tool that writes +01:00 all
    year put every summer slot an hour later than meant, and a local time that does not
    exist (02:30 on the night the clocks go forward) landed on 03:30's slot. A time must
    have the site's offset at that instant, or be in UTC."""
    await api.site()
    now = datetime.fromtimestamp(api.clock.now, UTC)
    body: dict[str, Any] = {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "fcfs",
        "opens_at": (now - timedelta(minutes=1)).isoformat(),
    }

    def slots(*times: str) -> dict[str, Any]:
        return {
            **body,
            "slots": [{"starts_at": t, "duration_minutes": 15, "capacity": 1} for t in times],
        }

    wrong = await api.call(
        "POST",
        "/v1/admin/releases",
        slots(
            "2027-01-12T09:00:00+01:00", "2027-07-12T09:00:00+01:00", "2027-03-28T02:30:00+01:00"
        ),
        ADMIN,
    )
    assert wrong.status == 400 and wrong.body["type"] == "/problems/validation-error", wrong.body
    assert [e["field"] for e in wrong.body["errors"]] == ["slots.1.starts_at", "slots.2.starts_at"]
    assert "not Europe/Paris's at that time (+02:00)" in wrong.body["errors"][0]["message"]
    assert (await api.call("GET", "/v1/releases")).body["releases"] == []  # nothing published
    right = await api.call(
        "POST",
        "/v1/admin/releases",
        slots(
            "2027-07-12T09:00:00+02:00",
            "2027-07-12T07:15:00Z",  # UTC is always understood
            "2027-10-31T02:30:00+02:00",  # the hour the clocks go back: both are right
            "2027-10-31T02:30:00+01:00",
        ),
        ADMIN,
    )
    assert right.status == 201, right.body
    starts = [s["starts_at"] for s in right.body["release"]["slots"]]
    assert starts == [
        "2027-07-12T09:00:00+02:00",
        "2027-07-12T09:15:00+02:00",
        "2027-10-31T02:30:00+02:00",
        "2027-10-31T02:30:00+01:00",
    ]
    path = f"/v1/admin/releases/{right.body['release']['id']}"
    moved = await api.call("PATCH", path, {"opens_at": "2027-06-01T09:00:00+01:00"}, ADMIN)
    assert moved.status == 400 and moved.body["errors"][0]["field"] == "opens_at", moved.body


@pytest.mark.parametrize(
    ("day", "inside", "outside"),
    [
        # Clocks forward: a day of 23 hours.
        ("2027-03-28", ["2027-03-28T00:30:00+01:00", "2027-03-28T23:30:00+02:00"],
         ["2027-03-27T23:45:00+01:00", "2027-03-29T00:15:00+02:00"]),
        # Clocks back: a day of 25 hours.
        ("2027-10-31", ["2027-10-31T00:30:00+02:00", "2027-10-31T23:30:00+01:00"],
         ["2027-10-30T23:45:00+02:00", "2027-11-01T00:15:00+01:00"]),
    ],
)  # fmt: skip
async def test_the_agenda_of_a_day_the_clocks_change(
    api: Api, day: str, inside: list[str], outside: list[str]
) -> None:
    """A day's agenda runs from the site's midnight to the next, 23 or 25 hours when the
    clocks change: read as a range of times (the slots' index finds it), where the local
    date of every booking the site ever had was computed."""
    await api.site()
    now = datetime.fromtimestamp(api.clock.now, UTC)
    body = {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "fcfs",
        "opens_at": (now - timedelta(minutes=1)).isoformat(),
        "slots": [
            {"starts_at": at, "duration_minutes": 15, "capacity": 1} for at in inside + outside
        ],
    }
    published = await api.call("POST", "/v1/admin/releases", body, ADMIN)
    assert published.status == 201, published.body
    for slot in published.body["release"]["slots"]:
        booking = {"slot_id": slot["id"], "applicant": applicant()}
        assert (await api.call("POST", "/v1/admin/bookings", booking, ADMIN)).status == 201
    agenda = await api.call("GET", f"/v1/admin/agenda?site=bobigny&date={day}", headers=ADMIN)
    assert agenda.status == 200, agenda.body
    starts = [datetime.fromisoformat(b["starts_at"]) for b in agenda.body["bookings"]]
    assert starts == [datetime.fromisoformat(at) for at in inside]
